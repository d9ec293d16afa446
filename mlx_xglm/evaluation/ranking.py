"""Picking the likeliest of several candidate continuations, with the XGLM paper's normalisations."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import XGLMError
from ..tokenization import Newlines
from .scoring import encode_pair, loglikelihood_tokens

SCORINGS = ("sum", "mean", "char", "unconditional")


@dataclass
class RankResult:
    """`scores` (one per candidate, higher is better), `best` (the highest's index), the raw `logprobs`."""

    scores: list[float]
    best: int
    logprobs: list[float]


def rank(
    model,
    tokenizer,
    context: str,
    candidates: list[str],
    scoring: str = "sum",
    *,
    neutral_context: str = "Answer:",
    newlines: Newlines = "space",
    batch_size: int = 16,
    group=None,
) -> RankResult:
    """Score each candidate continuation of `context` and pick the best, as the XGLM paper does.

    `scoring`: `"sum"` of the candidate's token log-probabilities; `"mean"` per candidate token;
    `"char"` per character of the candidate (lm-eval's acc_norm); `"unconditional"` minus the candidate's
    log-probability after `neutral_context`. The context is read once for all candidates. Include the
    separating space in the candidates (`" yes"`), as lm-eval does.
    """
    if scoring not in SCORINGS:
        raise XGLMError(f"scoring must be one of {', '.join(SCORINGS)}; got {scoring!r}", param="scoring")
    if not candidates:
        raise XGLMError("rank needs at least one candidate", param="candidates")
    pairs = [encode_pair(tokenizer, context, c, newlines=newlines) for c in candidates]
    if scoring == "unconditional":
        pairs += [encode_pair(tokenizer, neutral_context, c, newlines=newlines) for c in candidates]
    for (_, cont), text in zip(pairs, candidates + candidates, strict=False):
        if not cont:
            raise XGLMError(f"the candidate {text!r} has no tokens", param="candidates")
    results = loglikelihood_tokens(model, pairs, batch_size=batch_size, group=group)
    logprobs = [lp for lp, _ in results[: len(candidates)]]
    if scoring == "sum":
        scores = list(logprobs)
    elif scoring == "mean":
        scores = [lp / len(cont) for lp, (_, cont) in zip(logprobs, pairs, strict=False)]
    elif scoring == "char":
        scores = [lp / max(len(c), 1) for lp, c in zip(logprobs, candidates, strict=True)]
    else:
        neutral = [lp for lp, _ in results[len(candidates) :]]
        scores = [a - b for a, b in zip(logprobs, neutral, strict=True)]
    best = max(range(len(scores)), key=lambda i: scores[i])
    return RankResult(scores, best, logprobs)
