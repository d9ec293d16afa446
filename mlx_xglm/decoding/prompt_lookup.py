"""Prompt-lookup decoding: draft tokens copied from n-gram matches in the prompt and the text so far.

No draft model: when the last `max_matching_ngram_size` (or fewer) tokens occurred earlier, the tokens that
followed that earlier occurrence are proposed (transformers' `prompt_lookup_num_tokens`, vLLM's ngram
speculation, llama.cpp's lookup). The model reads the pending token and the proposals in one pass and keeps
them by the rule of speculative decoding (`accept_draft`), the proposer's distribution being a point mass
on each copied token: greedy output equals plain decoding's, and sampling follows the model's own
distribution. Copy-heavy tasks (translating or summarising a given text, editing code) accept long runs.
"""

from __future__ import annotations

from collections.abc import Generator

import mlx.core as mx
import numpy as np

from ..errors import XGLMError
from ..model.cache import RotatingKVCache
from ..model.token_ids import check_token_ids
from .cache import check_kv_bits, check_prompt_cache, make_prompt_cache, maybe_quantize_kv_cache
from .rows import CLEAR_CACHE_EVERY, generation_stream
from .sample_utils import LogitsProcessor, Sampler, greedy
from .speculative import accept_draft


def lookup_candidates(tokens: np.ndarray, num_tokens: int, max_ngram: int) -> np.ndarray:
    """Up to `num_tokens` tokens that followed the earliest earlier occurrence of the longest n-gram
    (`max_ngram` tokens at most) ending `tokens`; empty when none occurred (transformers' rule)."""
    for size in range(min(max_ngram, tokens.size - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens, size)
        for start in np.flatnonzero((windows == tokens[-size:]).all(axis=1)) + size:
            if start < tokens.size:
                return tokens[start : start + num_tokens]
    return tokens[:0]


def _check(num_tokens, max_ngram, sampler, prompt_cache) -> None:
    for name, value in (("prompt_lookup_num_tokens", num_tokens), ("max_matching_ngram_size", max_ngram)):
        if not (isinstance(value, int) and value >= 1):
            raise XGLMError(f"{name} must be 1 or more, got {value}", param=name)
    if sampler is not greedy and not hasattr(sampler, "distribution"):
        raise XGLMError(
            "prompt-lookup decoding needs to know the distribution a sampler draws from: use make_sampler, "
            "or give the sampler a distribution(logprobs) method returning its log-probabilities",
            param="sampler",
        )
    if prompt_cache is not None and any(isinstance(c, RotatingKVCache) for c in prompt_cache):
        raise XGLMError(
            "prompt-lookup decoding takes back rejected tokens, which a rotating cache (max_kv_size) cannot "
            "always do; use an unbounded prompt cache",
            param="max_kv_size",
        )


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
    `max_matching_ngram_size` tokens (or fewer) in `prompt` and the tokens generated so far; `from_draft`
    marks proposals the model accepted. Greedy output equals `generate_step`'s; a `sampler` from
    `make_sampler` keeps the model's distribution. `prompt_cache` is updated in place (rejected tokens are
    trimmed, so rotating caches are refused); when the generator ends or is closed it holds the prompt and
    the tokens handed out but the last. `kv_bits`, `kv_group_size` and `quantized_kv_start` are those of
    `generate_step`.
    """
    if prompt.ndim != 1 or prompt.size == 0:
        raise XGLMError(
            f"prompt must be a non-empty 1-D array of token ids, got shape {prompt.shape}", param="prompt"
        )
    check_token_ids(prompt, model.config.vocab_size, "prompt")
    if prefill_step_size < 1:
        raise XGLMError(f"prefill_step_size must be >= 1, got {prefill_step_size}", param="prefill_step_size")
    sampler = sampler or greedy
    _check(prompt_lookup_num_tokens, max_matching_ngram_size, sampler, prompt_cache)
    check_kv_bits(kv_bits, kv_group_size, quantized_kv_start, None, model.config.head_dim)
    cache = make_prompt_cache(model) if prompt_cache is None else prompt_cache
    check_prompt_cache(model, cache)
    start, prompt_size = cache[0].offset, prompt.size
    tokens = np.array(prompt, np.int64)  # the prompt and every token handed out: where lookups search
    vocab = model.config.vocab_size

    def verify(pending: mx.array, proposals: mx.array) -> mx.array:
        k = proposals.size
        inputs = mx.concatenate([pending, proposals])
        logits = model(inputs[None], cache=cache, logits_to_keep=k + 1)[0]
        if logits_processors:
            context = mx.array(tokens)
            rows = []
            for i in range(k + 1):
                row = logits[i : i + 1]
                for processor in logits_processors:
                    row = processor(mx.concatenate([context, proposals[:i]]), row)
                rows.append(row)
            logits = mx.concatenate(rows, axis=0)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    with mx.stream(generation_stream()):
        while prompt.size > prefill_step_size:
            model(prompt[:prefill_step_size][None], cache=cache)
            mx.eval([c.state for c in cache])
            prompt = prompt[prefill_step_size:]
            mx.clear_cache()
        if max_tokens == 0:
            model(prompt[None], cache=cache)
            maybe_quantize_kv_cache(cache, quantized_kv_start, kv_group_size, kv_bits)
            mx.eval([c.state for c in cache])
            return

    pending, produced = prompt, 0
    try:
        while produced < max_tokens:
            k = min(prompt_lookup_num_tokens, max_tokens - produced - 1)
            found = lookup_candidates(tokens, k, max_matching_ngram_size) if k else tokens[:0]
            k = found.size
            proposals = mx.array(found, mx.int32)
            maybe_quantize_kv_cache(cache, quantized_kv_start, kv_group_size, kv_bits)
            with mx.stream(generation_stream()):
                logprobs = verify(pending, proposals)
                # The proposer is sure of each copied token: its distribution is a point mass there.
                point = None
                if sampler is not greedy and k:
                    point = mx.log((mx.arange(vocab)[None] == proposals[:, None]).astype(logprobs.dtype))
                n, token = accept_draft(logprobs, proposals, point, sampler)
            mx.eval(n, token)
            n, token = n.item(), token.item()
            for layer in cache:
                layer.trim(k - n)
            new = found[:n].tolist() + [token]
            tokens = np.concatenate([tokens, np.array(new, np.int64)])
            pending = mx.array([token], prompt.dtype)
            for i, t in enumerate(new):
                produced += 1
                yield t, logprobs[i], i < n
            if produced % CLEAR_CACHE_EVERY < len(new):
                mx.clear_cache()
    finally:
        # None past the last token handed out stays in the cache.
        if produced:
            keep = start + prompt_size + produced - 1
            for layer in cache:
                layer.trim(layer.offset - keep)
