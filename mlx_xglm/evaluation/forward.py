"""Batched, padding-aware forward passes that return the log-probability of each scored token.

Two shapes of work: whole sequences (`score`, perplexity windows), left-padded into one batch; and
contexts shared by several continuations, where each context is read once and its KV cache is copied to
its continuations, so four answers after a long prompt cost little more than the prompt.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..model.cache import KVCache
from ..model.masks import padding_mask, padding_positions

# Positions per LM-head matmul: bounds the [positions, vocab_size] logits held at once (256 x 256008 floats).
HEAD_CHUNK = 256


def _padded_forward(model, inputs: mx.array, key_real: mx.array, cache=None) -> mx.array:
    """Final hidden states [B, L, d_model] of `inputs` [B, L] after the keys already in `cache`.

    `key_real` [B, S] marks the real keys (cached then new, S = cached + L): pads are hidden and positions
    count real tokens only (model/masks.py), so each row's numbers equal its unpadded self.
    """
    offset = key_real.shape[1] - inputs.shape[1]
    mask = padding_mask(key_real, inputs.shape[1], offset)
    return model.model(inputs, cache=cache, mask=mask, position_ids=padding_positions(key_real, offset))


def _target_logprobs(model, hidden: mx.array, targets: mx.array) -> tuple[np.ndarray, np.ndarray]:
    """log p(target) for each row of `hidden` [P, d], and whether the target is the argmax."""
    logprobs, greedy = [], []
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = model.head(hidden[start : start + HEAD_CHUNK]).astype(mx.float32)
        t = targets[start : start + HEAD_CHUNK]
        picked = mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        lp = picked - mx.logsumexp(logits, axis=-1)
        best = mx.argmax(logits, axis=-1) == t
        mx.eval(lp, best)
        logprobs.append(np.array(lp))
        greedy.append(np.array(best))
    if not logprobs:
        return np.zeros(0, np.float32), np.zeros(0, bool)
    return np.concatenate(logprobs), np.concatenate(greedy)


def sequence_logprobs(model, rows: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each id list in one batch: log p(row[i] | row[:i]) for i >= 1, and whether row[i] was the argmax.

    The rows are left-padded into one forward pass; positions count real tokens only, so each row's
    numbers equal its unpadded self.
    """
    width = max(len(r) for r in rows)
    pad = model.config.pad_token_id
    inputs = mx.array([[pad] * (width - len(r)) + list(r) for r in rows])
    key_real = mx.array([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    hidden = _padded_forward(model, inputs, key_real)
    # Row b's real tokens sit in the last len(row) columns; column c predicts the token in column c + 1.
    flat, targets = [], []
    for b, row in enumerate(rows):
        first = b * width + width - len(row)
        flat.extend(range(first, first + len(row) - 1))
        targets.extend(row[1:])
    lp, greedy = _target_logprobs(
        model, hidden.reshape(-1, hidden.shape[-1])[mx.array(flat, mx.int32)], mx.array(targets, mx.int32)
    )
    out, at = [], 0
    for row in rows:
        n = len(row) - 1
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
    width = max(len(c) for c in contexts)
    pad = model.config.pad_token_id
    inputs = mx.array([[pad] * (width - len(c)) + list(c) for c in contexts])
    key_real = mx.array([[False] * (width - len(c)) + [True] * len(c) for c in contexts])
    cache = model.make_cache()
    # Only the last context position goes on: it predicts every continuation's first token.
    scoring_rows = [_padded_forward(model, inputs, key_real, cache)[:, -1]]
    which = mx.array([g for g, _ in continuations])
    rest_len = max(len(c) - 1 for _, c in continuations)
    if rest_len:
        copies = [KVCache.from_state(_rows_of(layer.state, which), layer.meta_state) for layer in cache]
        rows = [c[:-1] + [pad] * (rest_len - len(c) + 1) for _, c in continuations]
        real = mx.array([[True] * (len(c) - 1) + [False] * (rest_len - len(c) + 1) for _, c in continuations])
        keys = mx.concatenate([key_real[which], real], axis=1)
        cont_hidden = _padded_forward(model, mx.array(rows), keys, copies)
        scoring_rows.append(cont_hidden.reshape(-1, cont_hidden.shape[-1]))
    # Row of each scored token in [last context positions; continuation positions], so that the LM
    # head (a pass over the whole vocab_size x d_model matrix) runs once.
    index, targets = [], []
    for i, (g, c) in enumerate(continuations):
        index.append(g)
        index.extend(len(contexts) + i * rest_len + j for j in range(len(c) - 1))
        targets.extend(c)
    hidden = mx.concatenate(scoring_rows)[mx.array(index, mx.int32)]
    lp, greedy = _target_logprobs(model, hidden, mx.array(targets, mx.int32))
    out, at = [], 0
    for _, c in continuations:
        out.append((lp[at : at + len(c)], greedy[at : at + len(c)]))
        at += len(c)
    return out
