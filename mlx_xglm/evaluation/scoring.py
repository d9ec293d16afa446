"""Scoring text with the model: per-token log-probabilities, continuation log-likelihoods, ranking.

The context/continuation split and the left truncation are lm-evaluation-harness's, so numbers equal
`lm_eval --model hf` on the same checkpoint; `newlines="eos"` reads every newline as `</s>`, the way
XGLM saw line breaks in training (fairseq's `replace_newline_with_eos`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..errors import XGLMError
from ..model.token_ids import check_token_ids
from ..tokenization import Newlines
from .distributed import run_sharded, world
from .forward import continuation_logprobs, sequence_logprobs
from .progress import request_progress


@dataclass
class ScoredText:
    """`tokens` (ids, starting with `</s>`), `logprobs` (one per token after the first) and their `total`."""

    tokens: list[int]
    logprobs: list[float]
    total: float


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise XGLMError(
            f"batch_size must be a whole number of 1 or more, got {batch_size!r}", param="batch_size"
        )


def score(
    model,
    tokenizer,
    texts: list[str],
    *,
    newlines: Newlines = "space",
    batch_size: int = 16,
    verbose=False,
    group=None,
) -> list[ScoredText]:
    """Log-probability of every token of each text given the tokens before it.

    Each text is encoded with its leading `</s>`; every later token is scored. With `newlines="eos"` this
    equals fairseq's `lm.score(text, replace_newline_with_eos=True)`, as the XGLM paper scored: the model
    reads `</s> line1 </s> line2` and the `</s>` between lines is scored too. Texts are read `batch_size`
    at a time, longest first; under `mlx.launch` the batches are shared among the processes.
    """
    _check_batch_size(batch_size)
    if isinstance(texts, str):
        raise XGLMError("texts must be a list of strings; wrap a single text in a list", param="texts")
    rows = [tokenizer.encode(t, newlines=newlines) for t in texts]
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def work(_, batch):
        return [lp.tolist() for lp, _ in sequence_logprobs(model, [rows[i] for i in batch])]

    with request_progress("Scoring texts", len(rows), verbose, group) as advance:
        results = run_sharded(batches, work, group, lambda b: advance(len(b)))
    out: list[ScoredText | None] = [None] * len(rows)
    for batch, logprobs in zip(batches, results, strict=True):
        for i, lp in zip(batch, logprobs, strict=True):
            out[i] = ScoredText(rows[i], list(lp), float(sum(lp)))
    return out


def encode_pair(
    tokenizer,
    context: str,
    continuation: str,
    *,
    newlines: Newlines = "space",
    prefix_token_id: int | None = None,
) -> tuple[list[int], list[int]]:
    """Context and continuation ids as lm-eval splits them for a causal model.

    Trailing spaces of the context move to the continuation; the whole text is encoded and split at the
    length of the encoded context. An empty context becomes `[prefix_token_id]` (default `</s>`, XGLM's
    document start; lm-eval's hf backend uses the tokenizer's bos `<s>`), unless the continuation already
    starts with that id.
    """
    if context == "":
        prefix = tokenizer.eos_token_id if prefix_token_id is None else prefix_token_id
        cont = tokenizer.encode(continuation, add_special_tokens=False, newlines=newlines)
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, newlines=newlines)
    context_ids = tokenizer.encode(context, newlines=newlines)
    return context_ids, whole[len(context_ids) :]


def loglikelihood_tokens(
    model,
    requests: list[tuple[list[int], list[int]]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    verbose=False,
    group=None,
) -> list[tuple[float, bool]]:
    """`(log p(continuation | context), is greedy)` for each `(context ids, continuation ids)` pair.

    As lm-eval's hf backend, a pair longer than `max_length + 1` ids (default: the model's
    `max_position_embeddings`) keeps only its last `max_length + 1` (one warning says how many were cut).
    Requests with the same context read it once: its KV cache is copied to each continuation. A batch
    holds at most `batch_size` continuations.
    """
    _check_batch_size(batch_size)
    max_length = model.config.max_position_embeddings if max_length is None else max_length
    if max_length < 1:
        raise XGLMError(f"max_length must be 1 or more, got {max_length}", param="max_length")
    groups: dict[tuple[int, ...], list[int]] = {}
    conts, truncated = [], 0
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = list(ctx), list(cont)
        if not ctx or not cont:
            raise XGLMError(f"request {i} has an empty context or continuation (as ids)", param="requests")
        check_token_ids([ctx, cont], model.config.vocab_size, "requests")
        if len(cont) > max_length:
            raise XGLMError(
                f"request {i}: the continuation has {len(cont)} tokens, more than the model reads at once "
                f"({max_length}); shorten it",
                param="requests",
            )
        whole = ctx + cont
        if len(whole) > max_length + 1:
            truncated += 1
            whole = whole[-(max_length + 1) :]
        groups.setdefault(tuple(whole[: -len(cont)]), []).append(i)
        conts.append(cont)
    if truncated and world(group).rank() == 0:
        warnings.warn(
            f"{truncated} of {len(requests)} requests are longer than the model's {max_length}-token window; "
            "their contexts were cut on the left, as lm-eval does",
            stacklevel=2,
        )
    keys = sorted(groups, key=lambda k: (-(len(k) + max(len(conts[i]) for i in groups[k])), k))
    batches, current, count = [], [], 0
    for key in keys:
        for start in range(0, len(groups[key]), batch_size):
            members = groups[key][start : start + batch_size]
            if current and count + len(members) > batch_size:
                batches.append(current)
                current, count = [], 0
            current.append((key, members))
            count += len(members)
    if current:
        batches.append(current)

    def work(_, batch):
        contexts = [list(key) for key, _ in batch]
        pairs = [(g, conts[i]) for g, (_, members) in enumerate(batch) for i in members]
        return [
            [float(lp.sum()), bool(greedy.all())]
            for lp, greedy in continuation_logprobs(model, contexts, pairs)
        ]

    with request_progress("Scoring requests", len(requests), verbose, group) as advance:
        results = run_sharded(batches, work, group, lambda b: advance(sum(len(m) for _, m in b)))
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    for batch, answers in zip(batches, results, strict=True):
        members = [i for _, m in batch for i in m]
        for i, (lp, greedy) in zip(members, answers, strict=True):
            out[i] = (float(lp), bool(greedy))
    return out


def loglikelihood(
    model,
    tokenizer,
    requests: list[tuple[str, str]],
    *,
    batch_size: int = 16,
    newlines: Newlines = "space",
    max_length: int | None = None,
    verbose=False,
    group=None,
) -> list[tuple[float, bool]]:
    """Log-probability of each continuation given its context, and whether it is the greedy continuation.

    `requests` are `(context, continuation)` texts, split into ids as lm-eval does (see `encode_pair`);
    word-separating spaces belong to the continuation (`("The dog", " barks")`). The rest is
    `loglikelihood_tokens`.
    """
    pairs = [encode_pair(tokenizer, c, x, newlines=newlines) for c, x in requests]
    for i, (_, cont) in enumerate(pairs):
        if not cont:
            raise XGLMError(
                f"request {i}: the continuation {requests[i][1]!r} has no tokens", param="requests"
            )
    return loglikelihood_tokens(
        model, pairs, batch_size=batch_size, max_length=max_length, verbose=verbose, group=group
    )
