"""Speculative decoding: a small draft model proposes tokens, the target model checks them in one pass.

Each round the draft proposes `num_draft_tokens` tokens one at a time; the target reads the pending token
and all proposals at once, which costs about one decoding step when decoding is bound by reading weights
or by the host's work per step. Tokens are accepted by the rule of Leviathan et al. and Chen et al. (2023):
proposal x with probability min(1, p(x) / q(x)), where p and q are the target's and the draft's sampling
distributions; at the first rejection a token is drawn from max(p - q, 0), renormalised; when every
proposal is accepted, one more token comes from the target's last row. The output then follows the
target's distribution exactly; with greedy sampling it is the target's own greedy output.
"""

from __future__ import annotations

from collections.abc import Generator

import mlx.core as mx

from ..errors import XGLMError
from ..model.cache import RotatingKVCache
from .cache import check_prompt_cache, make_prompt_cache
from .rows import CLEAR_CACHE_EVERY, generation_stream, prefill_chunks, row_logprobs
from .sample_utils import LogitsProcessor, Sampler, greedy


def check_draft_model(model, draft_model, tokenizer=None, draft_tokenizer=None) -> None:
    """Raise XGLMError (param "draft_model") unless `draft_model` can draft for `model`.

    Both must share the vocabulary, and, when both tokenizers are given, the same sentencepiece model:
    facebook/xglm-4.5B has its own 134-language vocabulary, so it cannot pair with the 30-language models.
    """
    vocab, draft_vocab = model.config.vocab_size, draft_model.config.vocab_size
    if vocab != draft_vocab:
        raise XGLMError(
            f"the draft model's vocabulary has {draft_vocab} tokens but the model's has {vocab}; "
            "a draft model must share the model's tokenizer",
            param="draft_model",
        )
    if tokenizer is None or draft_tokenizer is None:
        return
    same = tokenizer.sp_model.serialized_model_proto() == draft_tokenizer.sp_model.serialized_model_proto()
    if not same or len(tokenizer) != len(draft_tokenizer):
        raise XGLMError(
            "the draft model's tokenizer differs from the model's (facebook/xglm-4.5B has its own); "
            "pick a draft that shares the model's sentencepiece.bpe.model, such as xglm-564M for the "
            "1.7B, 2.9B and 7.5B models",
            param="draft_model",
        )


def _split_cache(model, draft_model, prompt_cache: list | None) -> tuple[list, list]:
    if prompt_cache is None:
        return make_prompt_cache(model), make_prompt_cache(draft_model)
    n, m = len(model.layers), len(draft_model.layers)
    if len(prompt_cache) != n + m:
        raise XGLMError(
            f"with a draft model the prompt cache holds the model's {n} layers followed by the draft's {m} "
            f"(make_prompt_cache(model) + make_prompt_cache(draft_model)), got {len(prompt_cache)} layers",
            param="prompt_cache",
        )
    if any(isinstance(c, RotatingKVCache) for c in prompt_cache):
        raise XGLMError(
            "speculative decoding takes back rejected tokens, which a rotating cache (max_kv_size) cannot "
            "always do; use an unbounded prompt cache",
            param="prompt_cache",
        )
    model_cache, draft_cache = prompt_cache[:n], prompt_cache[n:]
    check_prompt_cache(model, model_cache)
    check_prompt_cache(draft_model, draft_cache)
    if model_cache[0].offset != draft_cache[0].offset:
        raise XGLMError(
            f"the prompt cache holds {model_cache[0].offset} tokens for the model but "
            f"{draft_cache[0].offset} for the draft; both parts must hold the same tokens",
            param="prompt_cache",
        )
    return model_cache, draft_cache


def _trim(cache: list, n: int) -> None:
    for layer in cache:
        layer.trim(n)


def accept_draft(
    logprobs: mx.array, draft_tokens: mx.array, draft_dist: mx.array | None, sampler: Sampler
) -> tuple[mx.array, mx.array]:
    """How many of the k `draft_tokens` to accept, and the token that follows them, on the device.

    `logprobs` [k + 1, vocab] are the target's log-probabilities at each proposal and after the last one;
    `draft_dist` [k, vocab] the draft's sampling log-probabilities (None for greedy). Greedy keeps proposals
    while they equal the target's argmax; otherwise each is kept with probability min(1, p/q) and the first
    rejected one is replaced by a draw from max(p - q, 0).
    """
    k = draft_tokens.size
    if sampler is greedy:
        choice = greedy(logprobs)
        accepted = choice[:k] == draft_tokens
    elif k == 0:
        return mx.array(0), sampler(logprobs)[0]
    else:
        p = sampler.distribution(logprobs)
        index = draft_tokens[:, None]
        ratio = mx.take_along_axis(p[:k], index, axis=-1) - mx.take_along_axis(draft_dist, index, axis=-1)
        accepted = mx.log(mx.random.uniform(shape=(k,))) < ratio[:, 0]
        residual = mx.log(mx.maximum(mx.exp(p[:k]) - mx.exp(draft_dist), 0))
        choice = mx.random.categorical(mx.concatenate([residual, p[k:]], axis=0), axis=-1)
    n = mx.cumprod(accepted.astype(mx.int32)).sum() if k else mx.array(0)
    return n, choice[n]


def speculative_generate_step(
    prompt: mx.array,
    model,
    draft_model,
    *,
    num_draft_tokens: int = 3,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    prompt_cache: list | None = None,
    prefill_step_size: int = 512,
) -> Generator[tuple[int, mx.array, bool], None, None]:
    """Yield `(token, logprobs, from_draft)` for each new token after `prompt`, as `generate_step` does.

    `draft_model` (same tokenizer, see `check_draft_model`) proposes `num_draft_tokens` tokens per round and
    `model` checks them in one pass; `from_draft` says whether a token was a proposal the model accepted.
    Greedy output equals `generate_step`'s; a `sampler` from `make_sampler` keeps the model's distribution
    (a custom sampler needs a `distribution(logprobs)` method). `prompt_cache` is
    `make_prompt_cache(model) + make_prompt_cache(draft_model)`, updated in place; rejected tokens are
    trimmed from both parts, so rotating caches are refused. When the generator ends or is closed, both
    parts hold the same tokens: the prompt and the tokens handed out, except the last one or two.
    """
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError(f"prompt must be a non-empty 1-D array of token ids, got shape {prompt.shape}")
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be >= 1, got {prefill_step_size}")
    if not (isinstance(num_draft_tokens, int) and num_draft_tokens >= 1):
        raise XGLMError(
            f"num_draft_tokens must be 1 or more, got {num_draft_tokens}", param="num_draft_tokens"
        )
    sampler = sampler or greedy
    if sampler is not greedy and not hasattr(sampler, "distribution"):
        raise XGLMError(
            "speculative decoding needs to know the distribution a sampler draws from: use make_sampler, "
            "or give the sampler a distribution(logprobs) method returning its log-probabilities",
            param="sampler",
        )
    check_draft_model(model, draft_model)
    model_cache, draft_cache = _split_cache(model, draft_model, prompt_cache)
    start, prompt_size = model_cache[0].offset, prompt.size
    history = prompt  # the tokens logits processors see: the prompt and every accepted token

    def seen(*proposals: mx.array) -> mx.array | None:
        # What the processors see at the row after `proposals`: the history, then those proposals.
        return mx.concatenate([history, *proposals]) if logits_processors else None

    def draft(inputs: mx.array, k: int) -> tuple[mx.array, mx.array | None]:
        tokens, dists = [], []
        for _ in range(k):
            logits = draft_model(inputs[None], cache=draft_cache, logits_to_keep=1)[:, -1, :]
            logprobs = row_logprobs(logits, [logits_processors], [seen(*tokens)])
            if sampler is greedy:
                inputs = greedy(logprobs)
            else:
                dists.append(sampler.distribution(logprobs))
                inputs = mx.random.categorical(dists[-1], axis=-1)
            mx.async_eval(inputs)
            tokens.append(inputs)
        return mx.concatenate(tokens), mx.concatenate(dists) if dists else None

    def verify(inputs: mx.array, proposals: mx.array) -> mx.array:
        k = proposals.size
        logits = model(mx.concatenate([inputs, proposals])[None], cache=model_cache, logits_to_keep=k + 1)[0]
        # Row i of the logits follows the first i proposals.
        seen_rows = [seen(proposals[:i]) for i in range(k + 1)] if logits_processors else [None] * (k + 1)
        return row_logprobs(logits, [logits_processors] * (k + 1), seen_rows)

    with mx.stream(generation_stream()):
        # The prompt's last chunk is read with the first round's proposals.
        rest = prefill_chunks(model, prompt[None], model_cache, prefill_step_size)
        prefill_chunks(draft_model, prompt[None], draft_cache, prefill_step_size)
        if max_tokens == 0:
            model(rest, cache=model_cache, logits_to_keep=1)
            draft_model(rest, cache=draft_cache, logits_to_keep=1)
            mx.eval([c.state for c in model_cache + draft_cache])
            return

    pending = draft_pending = rest[0]
    produced = 0
    try:
        while produced < max_tokens:
            k = min(num_draft_tokens, max_tokens - produced - 1)
            with mx.stream(generation_stream()):
                proposals, draft_dist = draft(draft_pending, k) if k else (mx.array([], mx.int32), None)
                logprobs = verify(pending, proposals)
                n, token = accept_draft(logprobs, proposals, draft_dist, sampler)
            mx.eval(n, token, proposals)
            n, token, proposals = n.item(), token.item(), proposals.tolist()
            # Take back what the caches read past the accepted tokens (the draft never read its last one).
            _trim(model_cache, k - n)
            _trim(draft_cache, max(k - 1 - n, 0))
            new = proposals[:n] + [token]
            if logits_processors:
                history = mx.concatenate([history, mx.array(new, history.dtype)])
            pending = mx.array([token], prompt.dtype)
            if k == 0:
                draft_pending = mx.concatenate([draft_pending, pending])
            else:
                draft_pending = mx.array(proposals[k - 1 :] + [token] if n == k else [token], prompt.dtype)
            for i, t in enumerate(new):
                produced += 1
                yield t, logprobs[i], i < n
            if produced % CLEAR_CACHE_EVERY < len(new):
                mx.clear_cache()
    finally:
        # Leave both parts holding the same tokens, none past the last one handed out.
        keep = min(model_cache[0].offset, draft_cache[0].offset)
        if produced:
            keep = min(keep, start + prompt_size + produced - 1)
        _trim(model_cache, model_cache[0].offset - keep)
        _trim(draft_cache, draft_cache[0].offset - keep)
