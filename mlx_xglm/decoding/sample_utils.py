"""Samplers (log-probabilities -> token ids) and logits processors, built once and reused every step.

Everything here stays on the device: no value is read back to the host while a token is chosen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import mlx.core as mx

from ..errors import XGLMError

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

# Below this temperature sampling is greedy (as vLLM): dividing by it overflows the logits to infinity.
GREEDY_BELOW = 1e-5


def greedy(logprobs: mx.array) -> mx.array:
    """The most likely token of each row: the sampler at temperature 0."""
    return mx.argmax(logprobs, axis=-1)


def _keep_top_k(logprobs: mx.array, k: int) -> mx.array:
    vocab = logprobs.shape[-1]
    if k >= vocab:
        return logprobs
    dropped = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(logprobs, dropped, mx.array(-float("inf"), logprobs.dtype), axis=-1)


def _keep_top_p(logprobs: mx.array, p: float, min_keep: int) -> mx.array:
    order = mx.argsort(-logprobs, axis=-1)
    sorted_probs = mx.exp(mx.take_along_axis(logprobs, order, axis=-1))
    # A token stays while the mass of the more likely tokens before it is still below p.
    mass_before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
    rank = mx.arange(logprobs.shape[-1])
    keep_sorted = (mass_before < p) | (rank < min_keep)
    keep = mx.put_along_axis(mx.zeros(logprobs.shape, mx.bool_), order, keep_sorted, axis=-1)
    return mx.where(keep, logprobs, -float("inf"))


def _keep_min_p(logprobs: mx.array, min_p: float, min_keep: int) -> mx.array:
    threshold = logprobs.max(axis=-1, keepdims=True) + mx.log(mx.array(min_p, logprobs.dtype))
    keep = logprobs >= threshold
    if min_keep > 1:
        kth = mx.sort(logprobs, axis=-1)[..., -min_keep : -min_keep + 1]
        keep = keep | (logprobs >= kth)
    return mx.where(keep, logprobs, -float("inf"))


def make_sampler(
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
) -> Sampler:
    """A function from log-probabilities [B, vocab] to token ids [B].

    `temp` 0 (or below 1e-5, as vLLM) picks the most likely token (argmax). Otherwise the distribution is
    sharpened or flattened by `temp` and then cut, in transformers' order, to the `top_k` most likely
    tokens (0 = all), to the smallest set holding `top_p` of the mass (1.0 = all) and to tokens at least
    `min_p` times as likely as the best one (0.0 = all); the cuts never leave fewer than
    `min_tokens_to_keep` tokens. Sampling draws from MLX's global generator: `mx.random.seed(n)` makes it
    reproducible.
    """
    if not temp >= 0:
        raise XGLMError(f"temp must be >= 0, got {temp}", param="temp")
    if not math.isfinite(temp):
        raise XGLMError(f"temp must be a finite number, got {temp}", param="temp")
    if not 0 < top_p <= 1:
        raise XGLMError(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise XGLMError(f"top_k must be an integer >= 0, got {top_k}", param="top_k")
    if not 0 <= min_p <= 1:
        raise XGLMError(f"min_p must be in [0, 1], got {min_p}", param="min_p")
    if not (isinstance(min_tokens_to_keep, int) and min_tokens_to_keep >= 1):
        raise XGLMError(
            f"min_tokens_to_keep must be an integer >= 1, got {min_tokens_to_keep}",
            param="min_tokens_to_keep",
        )
    if temp < GREEDY_BELOW:
        return greedy

    def distribution(logprobs: mx.array) -> mx.array:
        logits = logprobs * (1 / temp)
        logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if top_k > 0:
            logits = _keep_top_k(logits, max(top_k, min_tokens_to_keep))
        if top_p < 1.0:
            logits = _keep_top_p(logits, top_p, min_tokens_to_keep)
        if min_p > 0.0:
            logits = _keep_min_p(logits, min_p, min_tokens_to_keep)
        return logits

    return CategoricalSampler(distribution)


class CategoricalSampler:
    """A sampler that draws from a distribution it can also show: `distribution(logprobs)` returns the
    log-probabilities it samples from (temperature applied, cut tokens at -inf), which speculative
    decoding needs for its accept/reject rule. Calling it draws one token per row."""

    def __init__(self, distribution: Callable[[mx.array], mx.array]):
        self.distribution = mx.compile(distribution)

        @partial(mx.compile, inputs=mx.random.state, outputs=mx.random.state)
        def sample(logprobs: mx.array) -> mx.array:
            return mx.random.categorical(distribution(logprobs), axis=-1)

        self._sample = sample

    def __call__(self, logprobs: mx.array) -> mx.array:
        return self._sample(logprobs)


def _finite(value, param: str, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise XGLMError(f"{param} must be a finite number, got {value!r}", param=param)
    if not low <= value <= high:
        raise XGLMError(f"{param} must be from {low} to {high}, got {value}", param=param)
    return float(value)


def make_logits_processors(
    logit_bias: dict[int, float] | None = None,
    repetition_penalty: float | None = None,
    repetition_context_size: int | None = 20,
    *,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
) -> list[LogitsProcessor]:
    """Functions `(tokens, logits) -> logits` applied in order before sampling.

    `logit_bias` adds a value to the logits of the given token ids. `repetition_penalty` (> 0; 1.0 = off)
    divides positive logits and multiplies negative ones of every token among the last
    `repetition_context_size` tokens (prompt included; None = all of them), as transformers'
    `repetition_penalty` does. `frequency_penalty` and `presence_penalty` (0 = off) are OpenAI's: each
    token's logit drops by `frequency_penalty` times the number of times it was generated so far, plus
    `presence_penalty` if it was generated at all. Tokens of the prompt do not count: the first `tokens`
    a penalty processor sees are taken as the prompt, so give each prompt its own list (rows continuing
    one prompt may share one).
    """
    processors = []
    if logit_bias:
        ids = mx.array([int(i) for i in logit_bias])
        bias = mx.array([_finite(v, "logit_bias") for v in logit_bias.values()])

        def add_bias(tokens: mx.array, logits: mx.array) -> mx.array:
            return logits.at[..., ids].add(bias.astype(logits.dtype))

        processors.append(add_bias)
    if repetition_penalty is not None and repetition_penalty != 1.0:
        if not (repetition_penalty > 0 and math.isfinite(repetition_penalty)):
            raise XGLMError(
                f"repetition_penalty must be > 0 and finite, got {repetition_penalty}",
                param="repetition_penalty",
            )
        if repetition_context_size is not None and not (
            isinstance(repetition_context_size, int) and repetition_context_size >= 1
        ):
            raise XGLMError(
                f"repetition_context_size must be an integer >= 1 or None, got {repetition_context_size}",
                param="repetition_context_size",
            )
        processors.append(_repetition_penalty(repetition_penalty, repetition_context_size))
    frequency = _finite(frequency_penalty, "frequency_penalty")
    presence = _finite(presence_penalty, "presence_penalty")
    if frequency or presence:
        processors.append(_OccurrencePenalty(frequency, presence))
    return processors


class _OccurrencePenalty:
    """OpenAI's frequency and presence penalties over the tokens generated after the first history seen."""

    def __init__(self, frequency: float, presence: float):
        self.frequency = frequency
        self.presence = presence
        self.prompt_length: int | None = None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens is None:
            return logits
        tokens = tokens.reshape(-1)
        if self.prompt_length is None:
            self.prompt_length = tokens.size
        generated = tokens[self.prompt_length :]
        if generated.size == 0:
            return logits
        counts = mx.zeros((logits.shape[-1],), mx.float32).at[generated].add(1.0)
        penalty = counts * self.frequency + (counts > 0) * self.presence
        return logits - penalty.astype(logits.dtype)


def _repetition_penalty(penalty: float, context_size: int | None) -> LogitsProcessor:
    def apply(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens is None or tokens.size == 0:
            return logits
        recent = tokens[..., -context_size:] if context_size else tokens
        recent = recent.reshape(logits.shape[:-1] + (-1,))
        seen = mx.take_along_axis(logits, recent, axis=-1)
        seen = mx.where(seen < 0, seen * penalty, seen / penalty)
        return mx.put_along_axis(logits, recent, seen, axis=-1)

    return apply
