"""Prompt-lookup decoding: draft tokens copied from n-gram matches in the prompt and the text so far.

No draft model: when the last `max_matching_ngram_size` (or fewer) tokens occurred earlier, the tokens that
followed that earlier occurrence are proposed (transformers' `prompt_lookup_num_tokens`, vLLM's ngram
speculation, llama.cpp's lookup), and `speculate` checks them as it checks a draft model's, the proposer's
distribution being a point mass on each copied token: greedy output equals plain decoding's, and sampling
follows the model's own distribution. Copy-heavy tasks (translating or summarising a given text, editing
code) accept long runs. Where copies are rejected, each costs a position of the model's pass (on a CPU about
as much as a decoding step, as the 256k-row head is read per position), so the proposal length adapts to
the recent acceptance and lookups pause after rounds that kept nothing.
"""

from __future__ import annotations

from collections.abc import Generator

import mlx.core as mx
import numpy as np

from ..errors import XGLMError
from ..model.cache import RotatingKVCache
from .cache import check_kv_bits, check_prompt_cache, make_prompt_cache
from .sample_utils import LogitsProcessor, Sampler, greedy
from .speculative import check_speculation, speculate

# Rounds without lookups after a round that kept no copied token: doubling up to this many.
MAX_PAUSE = 8


def lookup_candidates(tokens: np.ndarray, num_tokens: int, max_ngram: int) -> np.ndarray:
    """Up to `num_tokens` tokens that followed the earliest earlier occurrence of the longest n-gram
    (`max_ngram` tokens at most) ending `tokens`; empty when none occurred (transformers' rule)."""
    for size in range(min(max_ngram, tokens.size - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens, size)
        for start in np.flatnonzero((windows == tokens[-size:]).all(axis=1)) + size:
            if start < tokens.size:
                return tokens[start : start + num_tokens]
    return tokens[:0]


class PromptLookup:
    """A `Drafter` copying tokens from earlier matches in `prompt` and the tokens handed out.

    It proposes up to `limit` tokens: at first 2, twice as many (up to `num_tokens`) after a round that
    kept all it proposed, half as many after one that did not; after a round that kept none it skips
    lookups for 1, 2, 4 ... `MAX_PAUSE` rounds. Copying text soon gets long proposals (a pass over many
    positions costs much less per position than over one), and text that does not copy its prompt
    decodes at nearly the plain rate.
    """

    def __init__(self, prompt: mx.array, num_tokens: int, max_ngram: int, sampler: Sampler, vocab: int):
        self.tokens = np.array(prompt, np.int64)
        self.num_tokens, self.max_ngram = num_tokens, max_ngram
        self.sampler, self.vocab = sampler, vocab
        self.limit, self.pause, self.skip = min(2, num_tokens), 1, 0

    def start(self, prompt: mx.array, step_size: int, read_all: bool) -> None:
        pass

    def propose(self, k: int, history: mx.array | None) -> tuple[mx.array, mx.array | None]:
        k = 0 if self.skip else min(k, self.limit)
        found = lookup_candidates(self.tokens, k, self.max_ngram) if k else self.tokens[:0]
        proposals = mx.array(found, mx.int32)
        if self.sampler is greedy or not found.size:
            return proposals, None
        # The proposer is sure of each copied token: its distribution is a point mass there.
        return proposals, mx.log((mx.arange(self.vocab)[None] == proposals[:, None]).astype(mx.float32))

    def update(self, proposals: list[int], accepted: int, token: int) -> None:
        self.tokens = np.concatenate([self.tokens, np.array(proposals[:accepted] + [token], np.int64)])
        if not proposals:
            self.skip = max(self.skip - 1, 0)
        elif accepted == len(proposals):
            self.limit, self.pause = min(2 * self.limit, self.num_tokens), 1
        else:
            self.limit = max(self.limit // 2, 1)
            if accepted:
                self.pause = 1
            else:
                self.skip, self.pause = self.pause, min(2 * self.pause, MAX_PAUSE)

    def settle(self, keep: int) -> int:
        return keep


def prompt_lookup_generate_step(
    prompt: mx.array,
    model,
    *,
    prompt_lookup_num_tokens: int = 10,
    max_matching_ngram_size: int = 2,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    prompt_cache: list | None = None,
    prefill_step_size: int = 512,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
) -> Generator[tuple[int, mx.array, bool], None, None]:
    """Yield `(token, logprobs, from_draft)` for each new token after `prompt`, as `generate_step` does.

    Each round proposes up to `prompt_lookup_num_tokens` tokens copied after a match of the last
    `max_matching_ngram_size` tokens (or fewer) in `prompt` and the tokens generated so far (fewer while
    copies are being rejected, see `PromptLookup`); `from_draft` marks proposals the model accepted. Greedy
    output equals `generate_step`'s; a `sampler` from `make_sampler` keeps the model's distribution.
    `prompt_cache` is updated in place (rejected tokens are trimmed, so rotating caches are refused); when
    the generator ends or is closed it holds the prompt and the tokens handed out but the last. `kv_bits`,
    `kv_group_size` and `quantized_kv_start` are those of `generate_step`.
    """
    sampler = sampler or greedy
    check_speculation(prompt, model, sampler, prefill_step_size, "prompt-lookup decoding")
    for name, value in (
        ("prompt_lookup_num_tokens", prompt_lookup_num_tokens),
        ("max_matching_ngram_size", max_matching_ngram_size),
    ):
        if not (isinstance(value, int) and value >= 1):
            raise XGLMError(f"{name} must be 1 or more, got {value}", param=name)
    if prompt_cache is not None and any(isinstance(c, RotatingKVCache) for c in prompt_cache):
        raise XGLMError(
            "prompt-lookup decoding takes back rejected tokens, which a rotating cache (max_kv_size) cannot "
            "always do; use an unbounded prompt cache",
            param="max_kv_size",
        )
    check_kv_bits(kv_bits, kv_group_size, quantized_kv_start, None, model.config.head_dim)
    cache = make_prompt_cache(model) if prompt_cache is None else prompt_cache
    check_prompt_cache(model, cache)
    vocab = model.config.vocab_size
    drafter = PromptLookup(prompt, prompt_lookup_num_tokens, max_matching_ngram_size, sampler, vocab)
    yield from speculate(
        prompt,
        model,
        cache,
        drafter,
        num_tokens=prompt_lookup_num_tokens,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        prefill_step_size=prefill_step_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
    )
