"""Speculative decoding: a drafter proposes tokens, the target model checks them in one pass.

The drafter is a small draft model with its own cache (`DraftModel`, here) or n-gram lookup in the prompt
and the text so far (`PromptLookup`, prompt_lookup.py); `speculate` runs the rounds for both. Each round
the drafter proposes up to k tokens; the target reads the pending token and all proposals at once, which
costs about one decoding step when decoding is bound by reading weights or by the host's work per step.
Tokens are accepted by the rule of Leviathan et al. and Chen et al. (2023): proposal x with probability
min(1, p(x) / q(x)), where p and q are the target's and the draft's sampling distributions; at the first
rejection a token is drawn from max(p - q, 0), renormalised; when every proposal is accepted, one more
token comes from the target's last row. The output then follows the target's distribution exactly; with
greedy sampling it is the target's own greedy output.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Protocol

import mlx.core as mx

from ..errors import XGLMError
from ..model.cache import RotatingKVCache
from ..model.token_ids import check_token_ids
from .cache import check_prompt_cache, make_prompt_cache, maybe_quantize_kv_cache
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


class Drafter(Protocol):
    """What proposes tokens to `speculate`; it follows the tokens handed out through `update`."""

    def start(self, prompt: mx.array, step_size: int, read_all: bool) -> None:
        """Read `prompt` as the model does (chunks of `step_size`), all of it when `read_all`."""

    def propose(self, k: int, history: mx.array | None) -> tuple[mx.array, mx.array | None]:
        """Up to `k` tokens [k'] to check and, unless sampling is greedy, the log-distribution [k', vocab]
        each was drawn from; `history` is what logits processors see (None without processors)."""

    def update(self, proposals: list[int], accepted: int, token: int) -> None:
        """The first `accepted` proposals were kept and `token` followed them."""

    def settle(self, keep: int) -> int:
        """Hold at most `keep` positions of the text; return how many it holds."""


def check_speculation(prompt: mx.array, model, sampler: Sampler, prefill_step_size: int, what: str) -> None:
    """Raise XGLMError for a prompt, prefill size or sampler `speculate` cannot use (`what`: the method's
    name in messages)."""
    if prompt.ndim != 1 or prompt.size == 0:
        raise XGLMError(
            f"prompt must be a non-empty 1-D array of token ids, got shape {prompt.shape}", param="prompt"
        )
    check_token_ids(prompt, model.config.vocab_size, "prompt")
    if prefill_step_size < 1:
        raise XGLMError(f"prefill_step_size must be >= 1, got {prefill_step_size}", param="prefill_step_size")
    if sampler is not greedy and not hasattr(sampler, "distribution"):
        raise XGLMError(
            f"{what} needs to know the distribution a sampler draws from: use make_sampler, "
            "or give the sampler a distribution(logprobs) method returning its log-probabilities",
            param="sampler",
        )


def speculate(
    prompt: mx.array,
    model,
    cache: list,
    drafter: Drafter,
    *,
    num_tokens: int,
    max_tokens: int,
    sampler: Sampler,
    logits_processors: list[LogitsProcessor] | None,
    prefill_step_size: int,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
) -> Generator[tuple[int, mx.array, bool], None, None]:
    """The rounds of speculative decoding: `drafter` proposes up to `num_tokens` tokens, `model` reads the
    pending token and the proposals in one pass into `cache`, `accept_draft` keeps a prefix of them, and
    what the cache read past it is trimmed. Yields `(token, logprobs, from_draft)` as `generate_step` does;
    when it ends or is closed, `cache` holds no token past the last one handed out but one. Arguments are
    checked by the callers (`check_speculation`)."""
    start, prompt_size = cache[0].offset, prompt.size
    history = prompt  # the tokens logits processors see: the prompt and every token handed out

    def verify(pending: mx.array, proposals: mx.array) -> mx.array:
        k = proposals.size
        logits = model(mx.concatenate([pending, proposals])[None], cache=cache, logits_to_keep=k + 1)[0]
        # Row i of the logits follows the first i proposals.
        seen = [mx.concatenate([history, proposals[:i]]) for i in range(k + 1)] if logits_processors else None
        return row_logprobs(logits, [logits_processors] * (k + 1), seen or [None] * (k + 1))

    with mx.stream(generation_stream()):
        # The prompt's last chunk is read with the first round's proposals.
        pending = prefill_chunks(model, prompt[None], cache, prefill_step_size)[0]
        drafter.start(prompt, prefill_step_size, read_all=max_tokens == 0)
        if max_tokens == 0:
            model(pending[None], cache=cache, logits_to_keep=1)
            maybe_quantize_kv_cache(cache, quantized_kv_start, kv_group_size, kv_bits)
            mx.eval([c.state for c in cache])
            return

    produced = 0
    try:
        while produced < max_tokens:
            k = min(num_tokens, max_tokens - produced - 1)
            maybe_quantize_kv_cache(cache, quantized_kv_start, kv_group_size, kv_bits)
            with mx.stream(generation_stream()):
                proposals, dist = drafter.propose(k, history if logits_processors else None)
                logprobs = verify(pending, proposals)
                n, token = accept_draft(logprobs, proposals, dist, sampler)
            mx.eval(n, token, proposals)
            n, token, proposals = n.item(), token.item(), proposals.tolist()
            for layer in cache:
                layer.trim(len(proposals) - n)
            drafter.update(proposals, n, token)
            new = proposals[:n] + [token]
            if logits_processors:
                history = mx.concatenate([history, mx.array(new, history.dtype)])
            pending = mx.array([token], prompt.dtype)
            for i, t in enumerate(new):
                produced += 1
                yield t, logprobs[i], i < n
            if produced % CLEAR_CACHE_EVERY < len(new):
                mx.clear_cache()
    finally:
        # Leave the model and the drafter holding the same tokens, none past the last one handed out.
        keep = cache[0].offset
        if produced:
            keep = min(keep, start + prompt_size + produced - 1)
        keep = drafter.settle(keep)
        for layer in cache:
            layer.trim(layer.offset - keep)


class DraftModel:
    """A `Drafter` that is a small model with its own cache, drawing its proposals one at a time with the
    target's sampler and logits processors."""

    def __init__(self, model, cache: list, sampler: Sampler, logits_processors: list[LogitsProcessor] | None):
        self.model, self.cache = model, cache
        self.sampler, self.processors = sampler, logits_processors
        self.pending = None  # the tokens it has not read yet

    def start(self, prompt: mx.array, step_size: int, read_all: bool) -> None:
        self.pending = prefill_chunks(self.model, prompt[None], self.cache, step_size)[0]
        if read_all:
            self.model(self.pending[None], cache=self.cache, logits_to_keep=1)
            mx.eval([c.state for c in self.cache])

    def propose(self, k: int, history: mx.array | None) -> tuple[mx.array, mx.array | None]:
        if k == 0:
            return mx.array([], mx.int32), None
        inputs, tokens, dists = self.pending, [], []
        for _ in range(k):
            logits = self.model(inputs[None], cache=self.cache, logits_to_keep=1)[:, -1, :]
            seen = None if history is None else mx.concatenate([history, *tokens])
            logprobs = row_logprobs(logits, [self.processors], [seen])
            if self.sampler is greedy:
                inputs = greedy(logprobs)
            else:
                dists.append(self.sampler.distribution(logprobs))
                inputs = mx.random.categorical(dists[-1], axis=-1)
            mx.async_eval(inputs)
            tokens.append(inputs)
        return mx.concatenate(tokens), mx.concatenate(dists) if dists else None

    def update(self, proposals: list[int], accepted: int, token: int) -> None:
        k, dtype = len(proposals), self.pending.dtype
        if k == 0:
            self.pending = mx.concatenate([self.pending, mx.array([token], dtype)])
            return
        # It read every proposal but its last: take back those rejected.
        for layer in self.cache:
            layer.trim(max(k - 1 - accepted, 0))
        self.pending = mx.array(proposals[k - 1 :] + [token] if accepted == k else [token], dtype)

    def settle(self, keep: int) -> int:
        keep = min(keep, self.cache[0].offset)
        for layer in self.cache:
            layer.trim(layer.offset - keep)
        return keep


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
    sampler = sampler or greedy
    check_speculation(prompt, model, sampler, prefill_step_size, "speculative decoding")
    if not (isinstance(num_draft_tokens, int) and num_draft_tokens >= 1):
        raise XGLMError(
            f"num_draft_tokens must be 1 or more, got {num_draft_tokens}", param="num_draft_tokens"
        )
    check_draft_model(model, draft_model)
    model_cache, draft_cache = _split_cache(model, draft_model, prompt_cache)
    drafter = DraftModel(draft_model, draft_cache, sampler, logits_processors)
    yield from speculate(
        prompt,
        model,
        model_cache,
        drafter,
        num_tokens=num_draft_tokens,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        prefill_step_size=prefill_step_size,
    )
