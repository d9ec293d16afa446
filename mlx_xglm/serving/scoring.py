"""Log-probabilities for the API: of the prompt's own tokens (`echo`), and the likeliest alternatives."""

from __future__ import annotations

import mlx.core as mx

from ..model.logprobs import target_logprobs


def _top(rows: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The `k` largest entries of each row of `rows` [N, vocab], largest first: (ids, values)."""
    ids = mx.argpartition(-rows, kth=k - 1, axis=-1)[:, :k]
    values = mx.take_along_axis(rows, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(values, order, axis=-1)


def prompt_logprobs(
    model, ids: list[int], top: int = 0, cache: list | None = None
) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each token of `ids` after the first: its log-probability given the tokens before it, and the
    `top` likeliest tokens at that place as `(id, logprob)`, likeliest first.

    One forward pass over the whole prompt; the vocabulary-wide log-softmax is model/logprobs.py's, taken a
    chunk of positions at a time so a long prompt never holds [length, vocab] values at once. With `cache` (a
    prompt cache that has read the first `offset` tokens of `ids`, `offset` < len(ids)), only the tokens
    after that are read, and the result starts at token `offset` + 1; the cache reads them too.
    """
    offset = 0 if cache is None else cache[0].offset
    if len(ids) - offset < 2:
        return []
    tokens = mx.array(ids)
    hidden = model.model(tokens[None, offset:-1], cache=cache)[0]
    scored = target_logprobs(model.head, hidden, tokens[offset + 1 :], top=top)
    if not top:
        return [(lp, []) for lp in scored["logprobs"].tolist()]
    pairs = [
        list(zip(i, v, strict=True))
        for i, v in zip(scored["top_ids"].tolist(), scored["top_logprobs"].tolist(), strict=True)
    ]
    return list(zip(scored["logprobs"].tolist(), pairs, strict=True))


def top_logprobs(
    rows: list[mx.array], tokens: list[int], ks: list[int]
) -> list[tuple[float, list[tuple[int, float]]]]:
    """For generated tokens: each `token`'s log-probability in its row (a log-softmax over the vocabulary)
    and the row's `k` likeliest `(id, logprob)`, likeliest first."""
    if not rows:
        return []
    stacked = mx.stack([row.reshape(-1) for row in rows]).astype(mx.float32)
    chosen = mx.take_along_axis(stacked, mx.array(tokens)[:, None], axis=-1)[:, 0]
    k = max(ks)
    if k:
        top_ids, top_values = _top(stacked, k)
        mx.eval(chosen, top_ids, top_values)
        tops = [
            list(zip(i[:n], v[:n], strict=True))
            for i, v, n in zip(top_ids.tolist(), top_values.tolist(), ks, strict=True)
        ]
    else:
        mx.eval(chosen)
        tops = [[] for _ in rows]
    return list(zip(chosen.tolist(), tops, strict=True))
