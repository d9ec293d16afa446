"""Attention masks and token positions, in one place for the model, its full forward and the decoders.

A mask is None (every key visible), "causal" (the attention kernel's own causal mask, aligned to the end of
the keys), or an array broadcastable to [B, heads, L, S]: boolean (True = may attend) or additive (0 or
-inf). Positions are 0-based; a pad token gets -1, which reads the zero row of XGLM's position table.
Everything a decoding step needs is computed from sizes the host knows: nothing is read back from the
device.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class Positions:
    """0-based positions of L new tokens: `start`.. in every row, or per-row `ids` [B, L] (pads -1).

    `end` is one past the largest position; the host knows it, and it sizes the position table.
    """

    start: int = 0
    ids: mx.array | None = None
    end: int = 0

    @classmethod
    def range(cls, start: int, length: int) -> Positions:
        return cls(start=start, end=start + length)

    @classmethod
    def given(cls, ids: mx.array) -> Positions:
        """Positions a caller chose; the only case where their largest value is read back."""
        return cls(ids=ids, end=int(ids.max().item()) + 1 if ids.size else 0)


def causal(length: int) -> str | None:
    """The mask of `length` new queries over a cache without padding or window."""
    return "causal" if length > 1 else None


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


def padding_positions(attention_mask: mx.array, offset: int) -> Positions:
    """Positions of the new tokens of a [B, S] mask, counted over real tokens only (pads get -1).

    So a left-padded row reads the positions of its unpadded self, as transformers' generate() counts them.
    """
    counted = mx.cumsum(attention_mask.astype(mx.int32), axis=1)[:, offset:] - 1
    ids = mx.where(attention_mask[:, offset:] > 0, counted, -1)
    return Positions(ids=ids, end=attention_mask.shape[1])


def left_padding_mask(
    left_padding: mx.array, offset: int, length: int, window: int | None, dtype
) -> mx.array:
    """Additive [B, 1, L, offset + L] mask for `length` queries written after `offset` cached columns.

    Row b's keys before column `left_padding[b]` are pads, hidden; each query sees the keys up to itself,
    the `window` most recent only when given. A query still sees itself, so pad rows stay finite.
    """
    keys = mx.arange(offset + length)[None, None]
    queries = mx.arange(offset, offset + length)[None, :, None]
    allowed = (keys >= left_padding[:, None, None]) & (keys <= queries)
    if window is not None:
        allowed = allowed & (keys > queries - window)
    allowed = allowed | (keys == queries)
    return mx.where(allowed, mx.array(0, dtype), mx.array(-mx.inf, dtype))[:, None]


def left_padding_positions(
    left_padding: mx.array, shifts: mx.array, offset: int, length: int, end: int
) -> Positions:
    """Positions of `length` new columns after `offset`: column + shift for real tokens, -1 for pads."""
    columns = mx.arange(offset, offset + length)[None]
    ids = mx.where(columns >= left_padding[:, None], columns + shifts[:, None], -1)
    return Positions(ids=ids, end=end)
