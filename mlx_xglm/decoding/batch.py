"""Batched decoding: several prompts, left-padded, each row equal to its unbatched output."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx

from ..errors import XGLMError
from ..tokenization.prompt import Newlines, prompt_ids
from .generate import CLEAR_CACHE_EVERY, TextStream, generation_stream, print_stats
from .sample_utils import LogitsProcessor, Sampler, greedy


@dataclass
class BatchStats:
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    prompt_time: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    generation_time: float = 0.0
    peak_memory: float = 0.0


@dataclass
class BatchResponse:
    """Result of `batch_generate`: one text, id list and finish reason per prompt, plus timings."""

    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    stats: BatchStats = field(default_factory=BatchStats)


def _pad_mask(key_real: mx.array, length: int, dtype) -> mx.array:
    """Additive mask [B, 1, length, S] for the last `length` queries: causal, pad keys hidden.

    Each query may always see itself, so the rows of pad queries stay finite.
    """
    S = key_real.shape[1]
    key_pos = mx.arange(S)[None]
    query_pos = mx.arange(S - length, S)[:, None]
    allowed = ((key_pos <= query_pos) & key_real[:, None, :]) | (key_pos == query_pos)
    return mx.where(allowed[:, None], 0.0, -float("inf")).astype(dtype)


def batch_generate(
    model,
    tokenizer,
    prompts: list[str] | list[list[int]],
    max_tokens: int = 256,
    *,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    stop: str | list[str] | None = None,
    newlines: Newlines = "space",
    prefill_step_size: int = 512,
    verbose: bool = False,
) -> BatchResponse:
    """Generate for several prompts at once; each row ends on its own and equals its unbatched output.

    Prompts (texts or id lists) are left-padded; positions count real tokens only and masks hide the pad
    keys, in prefill and decoding. `sampler`, `logits_processors`, `stop` and `newlines` act per row as in
    `stream_generate`; `verbose` prints the stats footer.
    """
    rows = [prompt_ids(tokenizer, p, newlines=newlines) for p in prompts]
    if not rows or any(not r for r in rows):
        raise XGLMError("prompts must hold at least one prompt, and none may be empty", param="prompts")
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    inputs = mx.array([[pad] * (width - len(r)) + r for r in rows])
    key_real = mx.array([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    positions = mx.cumsum(key_real.astype(mx.int32), axis=1) - 1
    dtype = model.model.layer_norm.weight.dtype
    cache = model.make_cache()
    sampler = sampler or greedy
    streams = [TextStream(tokenizer, stop, newlines) for _ in rows]
    history = [mx.array(r) for r in rows]
    out_ids: list[list[int]] = [[] for _ in rows]
    texts = ["" for _ in rows]

    tic = time.perf_counter()
    with mx.stream(generation_stream):
        for start in range(0, width, prefill_step_size):
            end = min(start + prefill_step_size, width)
            logits = model(
                inputs[:, start:end],
                cache=cache,
                mask=_pad_mask(key_real[:, :end], end - start, dtype),
                position_ids=positions[:, start:end],
                logits_to_keep=1,
            )
            mx.eval([c.state for c in cache])
        last_pos = positions[:, -1:]
    prompt_time = time.perf_counter() - tic
    tic = time.perf_counter()
    logits = logits[:, -1, :]
    live = list(range(len(rows)))
    for n in range(max_tokens):
        with mx.stream(generation_stream):
            if logits_processors:
                row_logits = []
                for b in range(len(rows)):
                    row = logits[b : b + 1]
                    for processor in logits_processors:
                        row = processor(history[b], row)
                    row_logits.append(row)
                logits = mx.concatenate(row_logits, axis=0)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            y = sampler(logprobs)
            mx.async_eval(y)
        tokens = y.tolist()
        for b in list(live):
            out_ids[b].append(tokens[b])
            texts[b] += streams[b].add(tokens[b])
            if streams[b].finish_reason is None and n + 1 == max_tokens:
                streams[b].finish_reason = "length"
                texts[b] += streams[b].flush()
            if streams[b].finish_reason is not None:
                live.remove(b)
        if not live:
            break
        with mx.stream(generation_stream):
            if logits_processors:
                history = [mx.concatenate([h, y[b : b + 1]]) for b, h in enumerate(history)]
            key_real = mx.concatenate([key_real, mx.ones((len(rows), 1), mx.bool_)], axis=1)
            last_pos = last_pos + 1
            logits = model(y[:, None], cache=cache, mask=_pad_mask(key_real, 1, dtype), position_ids=last_pos)
            logits = logits[:, -1, :]
        if n % CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()
    generation_time = time.perf_counter() - tic
    generated = sum(len(i) for i in out_ids)
    stats = BatchStats(
        prompt_tokens=sum(len(r) for r in rows),
        prompt_tps=sum(len(r) for r in rows) / max(prompt_time, 1e-9),
        prompt_time=prompt_time,
        generation_tokens=generated,
        generation_tps=generated / max(generation_time, 1e-9),
        generation_time=generation_time,
        peak_memory=mx.get_peak_memory() / 1e9,
    )
    if verbose:
        print_stats(
            stats.prompt_tokens,
            stats.prompt_tps,
            stats.generation_tokens,
            stats.generation_tps,
            stats.peak_memory,
        )
    return BatchResponse(texts, out_ids, [s.finish_reason for s in streams], stats)
