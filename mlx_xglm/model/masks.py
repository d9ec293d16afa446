"""Attention masks and token positions, in one place for the model, its full forward and the decoders.

A mask is None (every key visible), "causal" (the fused kernel's own causal mask, aligned to the end of
the keys), or an array broadcastable to [B, heads, L, S]: boolean (True = may attend) or additive (0 or
-inf). Positions are 0-based; a pad token gets -1, which reads the zero row of XGLM's position table.
"""

from __future__ import annotations

import mlx.core as mx


def additive_mask(mask, length: int, keys: int, dtype) -> mx.array | None:
    """`mask` for `length` queries over `keys` keys as an additive array (0 or -inf), or None."""
    if mask is None:
        return None
    if isinstance(mask, str):
        queries = mx.arange(keys - length, keys)[:, None]
        mask = mx.arange(keys)[None] <= queries
    if mask.dtype == mx.bool_:
        return mx.where(mask, mx.array(0, dtype), mx.array(-mx.inf, dtype))
    return mask.astype(dtype)


def padding_mask(attention_mask: mx.array, length: int, offset: int) -> mx.array:
    """Boolean [B, 1, L, S] mask from a [B, S] mask of 1/0 over past + current keys.

    Causal, pads hidden as keys. Every query may still see itself, so a pad query never has an empty row
    (its output is meaningless but finite, and it cannot leak NaN into real tokens through the values).
    """
    keys = mx.arange(attention_mask.shape[1])
    queries = mx.arange(offset, offset + length)[:, None]
    causal = keys[None, :] <= queries
    real = attention_mask[:, None, None, :].astype(mx.bool_)
    return (causal & real) | (keys[None, :] == queries)


def padding_positions(attention_mask: mx.array, offset: int) -> mx.array:
    """Positions [B, S - offset] of the new tokens, counted over real tokens only (pads get -1).

    So a left-padded row reads the positions of its unpadded self, as transformers' generate() counts them.
    """
    counted = mx.cumsum(attention_mask.astype(mx.int32), axis=1)[:, offset:] - 1
    return mx.where(attention_mask[:, offset:] > 0, counted, -1)
