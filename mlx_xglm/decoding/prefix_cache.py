"""PrefixCache: an LRU of prompt caches keyed by the token sequences they read, for reuse across requests.

A server sees prompts that share long beginnings: a chat client resends the whole transcript each turn,
lm-eval sends each multiple-choice candidate after the same context. Each entry keeps the KV cache of one
sequence (prompt + generated tokens) and, for scored prompts, the log-probability of each of its tokens;
a new sequence that starts the same way continues from the longest cached beginning (the cache trimmed
to it) and reads only the rest. Entries are bounded in number (`max_size`) and in bytes (`max_bytes`, the
KV arrays they hold); the least recently used go first. mlx-lm's server keeps the same kind of LRU.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from ..errors import XGLMError

log = logging.getLogger(__name__)

# mlx-lm's server defaults: ten entries, no byte bound.
DEFAULT_PROMPT_CACHE_SIZE = 10


@dataclass
class Hit:
    """What `fetch` found: a cache of the caller's own holding the first `length` tokens (None on a miss)
    and, when scores were asked for, the scores of tokens 1..`length` (`scores[j]` is token j + 1's)."""

    cache: list | None
    length: int
    scores: list | None = None


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    cache: list
    nbytes: int
    scores: list | None = None  # scores[j]: (logprob, top pairs) of tokens[j + 1]; length <= read
    top: int = 0  # how many alternatives each score keeps

    @property
    def read(self) -> int:
        return self.cache[0].offset


def common_prefix(a, b) -> int:
    """How many leading tokens the id sequences `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _copy_cache(cache: list) -> list:
    """A copy of `cache` holding compact copies of its arrays: it shares no buffer with the original, so
    its bytes are its own and the original's in-place writes never copy because of it."""
    copies = []
    for layer in cache:
        state = tree_map(mx.contiguous, layer.state)
        copies.append(type(layer).from_state(state, layer.meta_state))
    mx.eval([c.state for c in copies])
    return copies


def _view(cache: list, length: int) -> list | None:
    """A new cache list over the same arrays, trimmed to `length` tokens; None when it cannot be trimmed.

    Sharing arrays is safe: MLX arrays are values, so the borrower's writes make new buffers."""
    view = [type(layer).from_state(layer.state, layer.meta_state) for layer in cache]
    drop = view[0].offset - length
    if drop and not all(layer.is_trimmable() for layer in view):
        return None
    for layer in view:
        layer.trim(drop)
    return view


def _state_bytes(cache: list) -> int:
    """Bytes of what the cache holds (its kept positions), which is what a compact copy takes."""
    return sum(a.nbytes for layer in cache for _, a in tree_flatten(layer.state))


class PrefixCache:
    """An LRU of prompt caches keyed by token sequences; see the module docstring.

    `max_size` entries and `max_bytes` bytes of KV arrays at most (None: no byte bound); both must be
    positive. `fetch(tokens)` finds the longest cached beginning of `tokens`; `insert(tokens, cache)`
    stores a copy of a cache that has read `tokens` (or all but the last of them, for a scored prompt).
    `hits`, `misses`, `nbytes` and `len()` say how it is used.
    """

    def __init__(self, max_size: int = DEFAULT_PROMPT_CACHE_SIZE, max_bytes: int | None = None):
        if max_size < 1:
            raise XGLMError(f"prompt_cache_size must be >= 1, got {max_size}", param="prompt_cache_size")
        if max_bytes is not None and max_bytes < 1:
            raise XGLMError(f"prompt_cache_bytes must be >= 1, got {max_bytes}", param="prompt_cache_bytes")
        self.max_size = max_size
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def fetch(self, tokens: list[int], top: int | None = None) -> Hit:
        """The longest cached beginning of `tokens` that leaves at least one token to read.

        For generation (`top` None) the hit's cache holds the first `length` tokens, `length` <
        len(tokens). For scoring (`top`: alternatives per position), only entries with scores of at
        least `top` alternatives count, and the hit also carries the scores of tokens 1..`length`
        (`length` <= len(tokens) - 1: the cache holds tokens 0..`length` - 1; when `length` is
        len(tokens) - 1 every score is known and nothing needs reading). The cache is the caller's to
        change; a miss has `length` 0 and no cache.
        """
        best, best_length = None, 0
        for entry in self._entries.values():
            common = common_prefix(entry.tokens, tokens)
            if top is None:
                length = min(common, len(tokens) - 1, entry.read)
            elif entry.scores is not None and entry.top >= top:
                length = min(common - 1, len(tokens) - 1, entry.read, len(entry.scores))
            else:
                continue
            if length > best_length and (view := _view(entry.cache, length)) is not None:
                best, best_length, best_view = entry, length, view
        if best is None:
            self.misses += 1
            log.debug(
                "prefix cache miss: %d tokens, %d entries, %d bytes", len(tokens), len(self), self.nbytes
            )
            return Hit(None, 0)
        self.hits += 1
        self._entries.move_to_end(best.tokens)
        log.debug(
            "prefix cache hit: %d of %d tokens cached, %d entries, %d bytes",
            best_length,
            len(tokens),
            len(self),
            self.nbytes,
        )
        scores = None
        if top is not None:
            scores = [(lp, pairs[:top]) for lp, pairs in best.scores[:best_length]]
        return Hit(best_view, best_length, scores)

    def insert(self, tokens: list[int], cache: list, scores: list | None = None, top: int = 0) -> None:
        """Keep a copy of `cache`, which has read the first tokens of `tokens` (all of them, or all but the
        last for a scored prompt); `scores[j]` is the (logprob, top pairs) of token j + 1, with `top`
        pairs each. Entries that this one makes redundant (a beginning of it, with no more scores) go.
        """
        key = tuple(tokens)
        if cache[0].offset > len(key) or cache[0].offset == 0:
            return
        for other in self._entries.values():
            covered = scores is None or (other.scores is not None and len(other.scores) >= len(scores))
            if covered and common_prefix(other.tokens, key) == len(key) and other.read >= cache[0].offset:
                self._entries.move_to_end(other.tokens)
                return
        for other in list(self._entries.values()):
            if common_prefix(other.tokens, key) != len(other.tokens) or other.read > cache[0].offset:
                continue
            if other.scores is not None and (scores is None or len(scores) < len(other.scores)):
                # The other's scores are of a beginning of these tokens: they stay true here.
                scores, top = other.scores, other.top
            self._remove(other.tokens)
        nbytes = _state_bytes(cache)
        if self.max_bytes is not None and nbytes > self.max_bytes:
            log.debug("prefix cache: an entry of %d bytes is over the bound and is not kept", nbytes)
            return
        self._remove(key)
        while self._entries and (
            len(self._entries) >= self.max_size
            or (self.max_bytes is not None and self.nbytes + nbytes > self.max_bytes)
        ):
            self._remove(next(iter(self._entries)))
        self._entries[key] = _Entry(key, _copy_cache(cache), nbytes, scores, top)
        self.nbytes += nbytes

    def _remove(self, key: tuple[int, ...]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
        self.nbytes = 0
