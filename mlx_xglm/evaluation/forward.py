"""Batched, padding-aware forward passes that return the log-probability of each scored token.

Two shapes of work: whole sequences (`score`, perplexity windows), left-padded into one batch; and
contexts shared by several continuations, where each context is read once and its KV cache is copied to
its continuations, so four answers after a long prompt cost little more than the prompt.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..model.cache import KVCache
from ..model.logprobs import target_logprobs
from ..model.masks import padding_mask, padding_positions
from ..tokenization.encoding import pad_rows


def _padded_forward(model, inputs: mx.array, key_real: mx.array, cache=None) -> mx.array:
    """Final hidden states [B, L, d_model] of `inputs` [B, L] after the keys already in `cache`.

    `key_real` [B, S] marks the real keys (cached then new, S = cached + L): pads are hidden and positions
    count real tokens only (model/masks.py), so each row's numbers equal its unpadded self.
    """
    offset = key_real.shape[1] - inputs.shape[1]
    mask = padding_mask(key_real, inputs.shape[1], offset)
    return model.model(inputs, cache=cache, mask=mask, position_ids=padding_positions(key_real, offset))


def _padded(rows: list[list[int]], side: str, pad: int, width: int = 0) -> tuple[mx.array, mx.array]:
    """`rows` padded on `side` to the longest (or `width`): ids [B, W] and which entries are real."""
    data = pad_rows(rows, max([width, *map(len, rows)]), pad, side, with_mask=True)
    return mx.array(data["input_ids"]), mx.array(data["attention_mask"]).astype(mx.bool_)


def _target_logprobs(model, hidden: mx.array, targets: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """log p(target) for each row of `hidden` [P, d], and whether the target is the argmax."""
    scored = target_logprobs(model.head, hidden, mx.array(targets, mx.int32), greedy=True)
    return scored["logprobs"], scored["greedy"]


def sequence_logprobs(
    model, rows: list[list[int]], last: list[int] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each id list in one batch: log p(row[i] | row[:i]) for i >= 1, and whether row[i] was the argmax.

    The rows are left-padded into one forward pass; positions count real tokens only, so each row's
    numbers equal its unpadded self. `last[b]` scores only row b's last `last[b]` tokens (perplexity's
    windows score their tail): the head and the vocabulary-wide softmax are most of the cost.
    """
    inputs, key_real = _padded([list(r) for r in rows], "left", model.config.pad_token_id)
    width = inputs.shape[1]
    hidden = _padded_forward(model, inputs, key_real)
    counts = [len(row) - 1 for row in rows] if last is None else last
    # Row b's real tokens sit in the last len(row) columns; column c predicts the token in column c + 1.
    flat, targets = [], []
    for b, (row, n) in enumerate(zip(rows, counts, strict=True)):
        end = b * width + width - 1
        flat.extend(range(end - n, end))
        targets.extend(row[len(row) - n :])
    scored_rows = hidden.reshape(-1, hidden.shape[-1])[mx.array(flat, mx.int32)]
    lp, greedy = _target_logprobs(model, scored_rows, targets)
    out, at = [], 0
    for n in counts:
        out.append((lp[at : at + n], greedy[at : at + n]))
        at += n
    return out


def _rows_of(state: tuple[mx.array, mx.array], which: mx.array) -> tuple[mx.array, mx.array]:
    return tuple(mx.take(a, which, axis=0) for a in state)


def continuation_logprobs(
    model, contexts: list[list[int]], continuations: list[tuple[int, list[int]]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Log-probabilities of continuations after shared contexts, each context read once.

    `contexts` are id lists (read together, left-padded); `continuations` are `(context index, ids)`.
    The contexts' KV cache is copied to the continuations that share it, which are then read together,
    right-padded. Returns, per continuation, log p(token | context, earlier tokens) and greedy flags.
    """
    pad = model.config.pad_token_id
    inputs, key_real = _padded([list(c) for c in contexts], "left", pad)
    cache = model.make_cache()
    # Only the last context position goes on: it predicts every continuation's first token.
    scoring_rows = [_padded_forward(model, inputs, key_real, cache)[:, -1]]
    which = mx.array([g for g, _ in continuations])
    rest_len = max(len(c) - 1 for _, c in continuations)
    if rest_len:
        copies = [KVCache.from_state(_rows_of(layer.state, which), layer.meta_state) for layer in cache]
        rows, real = _padded([list(c[:-1]) for _, c in continuations], "right", pad, rest_len)
        keys = mx.concatenate([key_real[which], real], axis=1)
        cont_hidden = _padded_forward(model, rows, keys, copies)
        scoring_rows.append(cont_hidden.reshape(-1, cont_hidden.shape[-1]))
    # Row of each scored token in [last context positions; continuation positions], so that the LM
    # head (a pass over the whole vocab_size x d_model matrix) runs once.
    index, targets = [], []
    for i, (g, c) in enumerate(continuations):
        index.append(g)
        index.extend(len(contexts) + i * rest_len + j for j in range(len(c) - 1))
        targets.extend(c)
    hidden = mx.concatenate(scoring_rows)[mx.array(index, mx.int32)]
    lp, greedy = _target_logprobs(model, hidden, targets)
    out, at = [], 0
    for _, c in continuations:
        out.append((lp[at : at + len(c)], greedy[at : at + len(c)]))
        at += len(c)
    return out
