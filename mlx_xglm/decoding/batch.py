"""batch_generate: several prompts decoded together by the engine, each row equal to its unbatched output."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import XGLMError
from ..tokenization.prompt import Newlines, prompt_ids
from .cache import cached_tokens, prompt_cache_max_kv_size
from .engine import BatchGenerator, BatchStats
from .generate import TextStream, print_stats
from .sample_utils import LogitsProcessor, Sampler
from .stop_strings import StopStrings


@dataclass
class BatchResponse:
    """Result of `batch_generate`: one text, id list and finish reason per prompt, plus timings."""

    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    stats: BatchStats = field(default_factory=BatchStats)


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
    max_kv_size: int | None = None,
    prompt_cache: list | None = None,
    completion_batch_size: int = 32,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    verbose: bool = False,
) -> BatchResponse:
    """Generate for several prompts at once; each row ends on its own and equals its unbatched output.

    Prompts (texts or id lists) decode together in a `BatchGenerator` (left-padded, positions counted
    over real tokens, at most `completion_batch_size` at a time). `sampler`, `logits_processors`, `stop`,
    `newlines` and `max_kv_size` act per row as in `stream_generate`. `prompt_cache` continues every row
    from one cache (e.g. a shared prefix) or, given as a list of caches, each row from its own; the caches
    are read, not changed, and a rotating one's window is the default `max_kv_size`. `kv_bits`,
    `kv_group_size` and `quantized_kv_start` quantize the cache as in `generate_step`. `verbose` prints the
    stats footer.
    """
    if prompt_cache is not None and prompt_cache and isinstance(prompt_cache[0], list):
        caches = list(prompt_cache)
        if len(caches) != len(prompts):
            raise XGLMError(
                f"prompt_cache holds {len(caches)} caches for {len(prompts)} prompts", param="prompt_cache"
            )
    else:
        caches = [prompt_cache] * len(prompts)
    if prompt_cache is not None and max_kv_size is None:
        max_kv_size = prompt_cache_max_kv_size(caches[0])
    rows = [
        prompt_ids(tokenizer, p, 0 if c is None else cached_tokens(c), newlines)
        for p, c in zip(prompts, caches, strict=True)
    ]
    if not rows or any(not r for r in rows):
        raise XGLMError("prompts must hold at least one prompt, and none may be empty", param="prompts")
    gen = BatchGenerator(
        model,
        max_tokens=max_tokens,
        sampler=sampler,
        completion_batch_size=completion_batch_size,
        prefill_step_size=prefill_step_size,
        max_kv_size=max_kv_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
    )
    uids = gen.insert(
        rows, caches=None if prompt_cache is None else caches, logits_processors=logits_processors
    )
    stops = StopStrings(stop)
    streams = {uid: TextStream(tokenizer, stops, newlines) for uid in uids}
    texts = {uid: "" for uid in uids}
    ids: dict[int, list[int]] = {uid: [] for uid in uids}
    while responses := gen.next():
        for r in responses:
            stream = streams[r.uid]
            ids[r.uid].append(r.token)
            texts[r.uid] += stream.add(r.token)
            if stream.finish_reason is None and r.finish_reason == "length":
                stream.finish_reason = "length"
                texts[r.uid] += stream.flush()
            elif stream.finish_reason is not None and r.finish_reason is None:
                gen.remove([r.uid])
    stats = gen.stats()
    if verbose:
        print_stats(
            stats.prompt_tokens,
            stats.prompt_tps,
            stats.generation_tokens,
            stats.generation_tps,
            stats.peak_memory,
        )
    return BatchResponse(
        [texts[u] for u in uids], [ids[u] for u in uids], [streams[u].finish_reason for u in uids], stats
    )
