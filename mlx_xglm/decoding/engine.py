"""BatchGenerator: many rows decoding at once, rows joining and leaving between steps.

API (mlx-lm's names; others code against it):

    gen = BatchGenerator(model, max_tokens=256, stop_tokens={2}, sampler=None, max_kv_size=None)
    uids = gen.insert([[2, 268, 9865], [2, 31227]], max_tokens=[20, 5], samplers=[s1, s2])
    while responses := gen.next():
        for r in responses: r.uid, r.token, r.logprobs, r.finish_reason
    gen.remove([uid])          # at any time; the row's next tokens are dropped
    gen.stats()                # BatchStats: tokens, tokens/s, peak memory

`Response.token` is the sampled id; `logprobs` the full log-softmax row [vocab] (an `mx.array`, after the
row's logits processors) it was sampled from; `finish_reason` is None while the row goes on, "stop" when
the token is one of `stop_tokens` (the token is still returned) and "length" at the row's `max_tokens`.
A finished row's response carries its `prompt_cache` (one single-row cache per layer; None in a quantized
batch), which has read its cache's tokens, its prompt and every token it returned: a later prompt that
starts with them can go on from it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx

from ..errors import XGLMError
from ..model.batch_cache import BatchKVCache
from ..model.cache import QuantizedKVCache
from ..model.token_ids import check_token_ids
from ..tokenization.encoding import pad_rows
from .cache import check_kv_bits, check_prompt_cache, maybe_quantize_kv_cache
from .rows import CLEAR_CACHE_EVERY, Rows
from .sample_utils import LogitsProcessor, Sampler, greedy


@dataclass
class Response:
    """One row's token from one `BatchGenerator.next()` call."""

    uid: int
    token: int
    logprobs: mx.array
    finish_reason: str | None
    prompt_cache: list | None = None


@dataclass
class BatchStats:
    """Totals of a BatchGenerator (or batch_generate): prompt and generated tokens, their rates, memory."""

    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    prompt_time: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    generation_time: float = 0.0
    peak_memory: float = 0.0


@dataclass
class _Request:
    uid: int
    prompt: list[int]
    max_tokens: int
    cache: list | None
    sampler: Sampler
    processors: list[LogitsProcessor] | None


def _joined(caches: list[BatchKVCache]) -> BatchKVCache:
    """One batch cache of the rows of `caches` (one layer each), right-aligned."""
    joined = caches[0]
    for other in caches[1:]:
        joined.extend(other)
    return joined


def per_row(value, n: int, name: str) -> list:
    """`value` for each of `n` prompts: a list or tuple gives one per prompt (else XGLMError naming `name`),
    anything else is every prompt's."""
    if value is None or not isinstance(value, list | tuple):
        return [value] * n
    if len(value) != n:
        raise XGLMError(f"{name} has {len(value)} entries for {n} prompts; give one per prompt", param=name)
    return list(value)


def row_settings(model, prompts, max_tokens, samplers, logits_processors, default_max_tokens: int):
    """Check `prompts` for an `insert` and give each its `(max_tokens, sampler, logits_processors)`.

    Prompts are non-empty lists of token ids in the model's vocabulary. Each setting is one value for all
    prompts or a list with one per prompt; a None `max_tokens` is `default_max_tokens`, a None sampler the
    generator's own; `logits_processors` is one list of processors or a list of such lists.
    """
    n = len(prompts)
    if any(not isinstance(p, list | tuple) or not p for p in prompts):
        raise XGLMError("prompts must each be a non-empty list of token ids", param="prompts")
    check_token_ids(prompts, model.config.vocab_size, "prompts")
    limits = [default_max_tokens if m is None else m for m in per_row(max_tokens, n, "max_tokens")]
    for limit in limits:
        if limit < 1:
            raise XGLMError(f"max_tokens must be >= 1, got {limit}", param="max_tokens")
    if not logits_processors or callable(logits_processors[0]):
        processors = [logits_processors or None] * n
    else:
        processors = [p or None for p in per_row(list(logits_processors), n, "logits_processors")]
    return list(zip(limits, per_row(samplers, n, "samplers"), processors, strict=True))


class BatchGenerator:
    """Decode many prompts at once; rows join (`insert`) and leave (`remove`, or on their own) any time.

    `max_tokens` and `sampler` (default: greedy) are the defaults of inserted rows; a row stops after
    one of `stop_tokens`. At most `completion_batch_size` rows decode together; waiting prompts are
    prefilled `prefill_batch_size` at a time (left-padded, positions counted over real tokens, in chunks
    of `prefill_step_size`) and join at the next step. Every row's cache keeps its own window with
    `max_kv_size`. With `kv_bits`, the batch's keys and values are quantized (`kv_group_size` values per
    scale) once it holds more than `quantized_kv_start` positions, as `generate_step`'s; rows joining a
    quantized batch are quantized. Each row's tokens equal those of its prompt decoded alone.
    """

    def __init__(
        self,
        model,
        max_tokens: int = 256,
        stop_tokens=None,
        sampler: Sampler | None = None,
        completion_batch_size: int = 32,
        prefill_batch_size: int = 8,
        prefill_step_size: int = 512,
        max_kv_size: int | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        quantized_kv_start: int = 0,
    ):
        for name, value in [
            ("completion_batch_size", completion_batch_size),
            ("prefill_batch_size", prefill_batch_size),
            ("prefill_step_size", prefill_step_size),
        ]:
            if value < 1:
                raise XGLMError(f"{name} must be >= 1, got {value}", param=name)
        if max_kv_size is not None and max_kv_size < 1:
            raise XGLMError(
                f"max_kv_size must be a positive number of tokens, got {max_kv_size}", param="max_kv_size"
            )
        check_kv_bits(kv_bits, kv_group_size, quantized_kv_start, max_kv_size, model.config.head_dim)
        self.kv_bits, self.kv_group_size, self.quantized_kv_start = kv_bits, kv_group_size, quantized_kv_start
        self.model = model
        self.max_tokens = max_tokens
        self.stop_tokens = set(stop_tokens or ())
        self.sampler = sampler or greedy
        self.completion_batch_size = completion_batch_size
        self.prefill_batch_size = prefill_batch_size
        self.prefill_step_size = prefill_step_size
        self.max_kv_size = max_kv_size
        self._waiting: list[_Request] = []
        self._active: Rows | None = None
        self._next_uid = 0
        self._steps = 0
        self._stats = BatchStats()

    def insert(
        self,
        prompts: list[list[int]],
        max_tokens: int | list[int] | None = None,
        caches: list | None = None,
        samplers: list[Sampler] | None = None,
        logits_processors: list[list[LogitsProcessor]] | None = None,
    ) -> list[int]:
        """Queue `prompts` (lists of token ids); returns their uids, in order.

        Per prompt (a list) or for all (one value): `max_tokens`, a sampler, a list of logits processors.
        `caches` holds one prompt cache (or None) per prompt to continue from; it is read, not changed,
        must have the generator's `max_kv_size`. Rows with and without caches are prefilled together.
        """
        settings = row_settings(self.model, prompts, max_tokens, samplers, logits_processors, self.max_tokens)
        caches = [None] * len(prompts) if caches is None else per_row(list(caches), len(prompts), "caches")
        uids = []
        for prompt, (limit, sampler, procs), cache in zip(prompts, settings, caches, strict=True):
            if cache is not None:
                check_prompt_cache(self.model, cache)
                if getattr(cache[0], "max_size", None) != self.max_kv_size:
                    raise XGLMError(
                        f"a prompt cache made with max_kv_size {getattr(cache[0], 'max_size', None)} cannot "
                        f"continue in a generator with max_kv_size {self.max_kv_size}; make both the same",
                        param="caches",
                    )
                bits = getattr(cache[0], "bits", None)
                if bits is not None and (bits, cache[0].group_size) != (self.kv_bits, self.kv_group_size):
                    raise XGLMError(
                        f"a prompt cache quantized to {bits} bits in groups of {cache[0].group_size} needs a "
                        "generator with that kv_bits and kv_group_size",
                        param="caches",
                    )
            self._waiting.append(
                _Request(self._next_uid, list(prompt), limit, cache, sampler or self.sampler, procs or None)
            )
            uids.append(self._next_uid)
            self._next_uid += 1
        return uids

    def remove(self, uids) -> None:
        """Drop the rows (decoding or waiting) with these uids; unknown uids are ignored."""
        uids = set(uids)
        self._waiting = [r for r in self._waiting if r.uid not in uids]
        if self._active is not None:
            keep = [i for i, uid in enumerate(self._active.uids) if uid not in uids]
            self._drop_rows(keep)

    @property
    def num_active(self) -> int:
        """Rows decoding now."""
        return len(self._active) if self._active is not None else 0

    @property
    def num_waiting(self) -> int:
        """Rows inserted and waiting for their prefill."""
        return len(self._waiting)

    def stats(self) -> BatchStats:
        """Totals so far: prompt and generated tokens, their rates, and peak memory (GB)."""
        s = self._stats
        s.prompt_tps = s.prompt_tokens / max(s.prompt_time, 1e-9)
        s.generation_tps = s.generation_tokens / max(s.generation_time, 1e-9)
        s.peak_memory = mx.get_peak_memory() / 1e9
        return s

    def _drop_rows(self, keep: list[int]) -> None:
        if not keep:
            self._active = None
        elif len(keep) < len(self._active):
            self._active.filter(keep)

    def _prefill(self, requests: list[_Request]) -> Rows:
        """Prefill `requests` together: fresh prompts left-padded; when any row brings its own cache, every
        row's cache right-aligned and its prompt right-padded, then moved right (pads to the left)."""
        prompts = [list(r.prompt) for r in requests]
        width = max(map(len, prompts))
        pad = self.model.config.pad_token_id
        lengths = None
        if all(r.cache is None for r in requests):
            padding = [width - len(p) for p in prompts]
            cache = [BatchKVCache(padding, max_size=self.max_kv_size) for _ in self.model.layers]
            inputs = mx.array(pad_rows(prompts, width, pad, "left", False)["input_ids"])
        else:
            cache = [self._row_cache(r) for r in requests]
            cache = [_joined([row[i] for row in cache]) for i in range(len(self.model.layers))]
            lengths = [len(p) for p in prompts]
            inputs = mx.array(pad_rows(prompts, width, pad, "right", False)["input_ids"])
        rows = Rows(
            [r.uid for r in requests],
            cache,
            [r.sampler for r in requests],
            [r.processors for r in requests],
            [mx.array(r.prompt) if r.processors else None for r in requests],
            [r.max_tokens for r in requests],
        )
        rows.prefill(self.model, inputs, self.prefill_step_size, lengths=lengths)
        self._stats.prompt_tokens += sum(len(r.prompt) for r in requests)
        return rows

    def _row_cache(self, request: _Request) -> list[BatchKVCache]:
        if request.cache is None:
            return [BatchKVCache([0], max_size=self.max_kv_size) for _ in self.model.layers]
        return [BatchKVCache.from_cache(c, self.max_kv_size) for c in request.cache]

    def _admit(self) -> None:
        """Prefill waiting prompts, `prefill_batch_size` at a time, while there is room."""
        while self._waiting:
            room = self.completion_batch_size - (len(self._active) if self._active else 0)
            if room < 1:
                return
            take = min(room, self.prefill_batch_size, len(self._waiting))
            if self.max_kv_size is not None or self.kv_bits is not None:
                # A window drops old columns while the longest row is read, which the shorter rows of a
                # right-padded prefill may still need, and quantized keys are not moved: there, a row with
                # its own cache is prefilled alone.
                cached = [i for i, r in enumerate(self._waiting[:take]) if r.cache is not None]
                if cached:
                    take = max(cached[0], 1)
            requests, self._waiting = self._waiting[:take], self._waiting[take:]
            rows = self._prefill(requests)
            if self._active is None:
                self._active = rows
            else:
                if any(isinstance(r.cache[0], QuantizedKVCache) for r in (self._active, rows)):
                    for r in (self._active, rows):
                        maybe_quantize_kv_cache(r.cache, -1, self.kv_group_size, self.kv_bits)
                self._active.extend(rows)

    def next(self) -> list[Response]:
        """One token for every decoding row (an empty list when no row is left); see the module docstring."""
        tic = time.perf_counter()
        if self._waiting and (self._active is None or len(self._active) < self.completion_batch_size):
            self._admit()
            toc = time.perf_counter()
            self._stats.prompt_time += toc - tic
            tic = toc
        rows = self._active
        if rows is None:
            return []
        y, logprobs = rows.y, rows.logprobs
        maybe_quantize_kv_cache(rows.cache, self.quantized_kv_start, self.kv_group_size, self.kv_bits)
        rows.step(self.model)
        tokens = y.tolist()
        responses, keep = [], []
        for b, token in enumerate(tokens):
            rows.counts[b] += 1
            if token in self.stop_tokens:
                reason = "stop"
            elif rows.counts[b] >= rows.max_tokens[b]:
                reason = "length"
            else:
                reason = None
                keep.append(b)
            cache = None
            if reason is not None and not isinstance(rows.cache[0], QuantizedKVCache):
                cache = [c.extract(b) for c in rows.cache]
            responses.append(Response(rows.uids[b], token, logprobs[b], reason, cache))
        self._drop_rows(keep)
        self._steps += 1
        if self._steps % CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()
        self._stats.generation_tokens += len(responses)
        self._stats.generation_time += time.perf_counter() - tic
        return responses
