"""Perplexity of long texts with Hugging Face's strided sliding window."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import XGLMError
from ..tokenization import Newlines
from .distributed import run_sharded
from .forward import sequence_logprobs
from .progress import request_progress


@dataclass
class PerplexityResult:
    """`perplexity` = exp(`nll` / `tokens`): the summed negative log-likelihood over the scored tokens."""

    perplexity: float
    nll: float
    tokens: int


def exp_nll(nll: float, tokens: int) -> float:
    """exp(`nll` / `tokens`), infinity where that overflows a float (a mean above ~709.78 nats)."""
    try:
        return math.exp(nll / tokens)
    except OverflowError:
        return math.inf


def strided_windows(n_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """`(begin, end, scored)` windows over `n_tokens` ids: ids[begin:end] is read and its last `scored`
    ids are scored, so each id after the first is scored once with the longest context a window gives.

    With `stride == context_length` the windows are disjoint and, as in Hugging Face's method, the first
    id of each later window has no context inside its window and goes unscored."""
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context_length, n_tokens)
        # The first id of a window (the leading </s> in the first) has nothing before it to be scored from.
        windows.append((begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def perplexity(
    model,
    tokenizer,
    text: str,
    *,
    context_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    newlines: Newlines = "space",
    verbose=False,
    group=None,
) -> PerplexityResult:
    """Perplexity of `text` by Hugging Face's strided method.

    The ids (with the leading `</s>`) are read in windows of `context_length` tokens (default: the model's
    `max_position_embeddings`) starting every `stride` tokens (default: half a window); each token is
    scored once, with the longest context its window gives, and the leading `</s>` is never scored.
    Windows are read `batch_size` at a time; under `mlx.launch` they are shared among the processes.
    """
    if context_length is None:
        context_length = model.config.max_position_embeddings
    if stride is None:
        stride = max(context_length // 2, 1)
    if context_length < 2:
        raise XGLMError(f"context_length must be 2 or more, got {context_length}", param="context_length")
    if not 1 <= stride <= context_length:
        raise XGLMError(
            f"stride must be between 1 and the context length ({context_length}), got {stride}",
            param="stride",
        )
    if batch_size < 1:
        raise XGLMError(f"batch_size must be 1 or more, got {batch_size}", param="batch_size")
    ids = tokenizer.encode(text, newlines=newlines)
    if len(ids) < 2:
        raise XGLMError("the text has no tokens to score (it is empty or only whitespace)", param="text")
    windows = strided_windows(len(ids), context_length, stride)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]

    def work(_, batch):
        rows = [ids[begin:end] for begin, end, _ in batch]
        scored = sequence_logprobs(model, rows, [n for _, _, n in batch])
        return [float(-lp.astype("float64").sum()) for lp, _ in scored]

    with request_progress("Perplexity windows", len(windows), verbose, group) as advance:
        results = run_sharded(batches, work, group, lambda b: advance(len(b)))
    nll = math.fsum(x for batch in results for x in batch)
    tokens = sum(n for _, _, n in windows)
    return PerplexityResult(exp_nll(nll, tokens), nll, tokens)
