"""The KV cache of a batch of rows that decode together, rows joining (`extend`) and leaving (`filter`).

Keys and values are arrays, or (packed ints, scales, biases) tuples in the quantized batch cache: `_each`
applies an array operation to either.
"""

from __future__ import annotations

import mlx.core as mx

from .cache import KVCache, QuantizedKVCache, RotatingKVCache
from .masks import Positions, causal, left_padding_mask, left_padding_positions


def _each(fn, x):
    return tuple(fn(part) for part in x) if isinstance(x, tuple) else fn(x)


class BatchKVCache(KVCache):
    """Keys and values of one layer for B rows, [B, heads, S, head_dim], each row's keys at the right.

    Row b holds real keys in columns `left_padding[b]`..`offset - 1` (pads before them); the key in column
    j has position j + `shifts[b]`. Rows of different lengths therefore share one array, and a step writes
    one column for every row. With `max_size`, each query sees the `max_size` most recent positions of its
    row, and when the array is full the columns no row can see any more are dropped, so memory stays
    bounded. Follows the cache protocol of the single-row caches: `offset`, `update_and_fetch`,
    `make_mask`, `make_positions`, `state`.
    """

    def __init__(self, left_padding: list[int], shifts: list[int] | None = None, max_size: int | None = None):
        super().__init__()
        if max_size is not None:
            # Grown in smaller steps, so the columns past the window are few.
            self.step = min(self.step, max_size)
        self.left_padding = list(left_padding)
        # A fresh left-padded row: its first real column holds position 0.
        self.shifts = [-p for p in left_padding] if shifts is None else list(shifts)
        self.max_size = max_size

    @classmethod
    def from_cache(cls, cache, max_size: int | None = None) -> BatchKVCache:
        """A one-row batch cache holding what the single-row `cache` (any of cache.py's) holds."""
        state = cache.state
        quantized = bool(state) and isinstance(state[0], tuple)
        kept = (state[0][0] if quantized else state[0]).shape[2] if state else 0
        if max_size is not None and kept > max_size:
            state, kept = (state[0][..., -max_size:, :], state[1][..., -max_size:, :]), max_size
        batch = cls([0], [cache.offset - kept], max_size)
        if state:
            if quantized:
                batch = batch.to_quantized(cache.group_size, cache.bits)
            batch.keys, batch.values = state
            batch.offset = kept
        return batch

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> BatchQuantizedKVCache:
        """The same rows, their keys and values quantized (see `QuantizedKVCache`)."""
        quantized = BatchQuantizedKVCache(self.left_padding, self.shifts, group_size, bits)
        if self.keys is not None and self.offset:
            QuantizedKVCache.update_and_fetch(quantized, *self.state)
        return quantized

    def __len__(self) -> int:
        return len(self.left_padding)

    def _dropped(self, length: int) -> int:
        """Columns to drop before writing `length` more: only in a full window cache."""
        if self.max_size is None or self.keys is None or self.offset + length <= self.keys.shape[2]:
            return 0
        return max(0, self.offset - self.max_size)

    def _drop(self, n: int) -> None:
        if n > 0:
            self.keys = _each(lambda a: a[..., n : self.offset, :], self.keys)
            self.values = _each(lambda a: a[..., n : self.offset, :], self.values)
            self.offset -= n
            self.left_padding = [max(0, p - n) for p in self.left_padding]
            self.shifts = [s + n for s in self.shifts]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self._drop(self._dropped(keys.shape[2]))
        return super().update_and_fetch(keys, values)

    def _layout(self, length: int) -> tuple[int, list[int], list[int]]:
        """Offset, left padding and shifts as they will be when `length` new columns are written."""
        n = self._dropped(length)
        return self.offset - n, [max(0, p - n) for p in self.left_padding], [s + n for s in self.shifts]

    def make_mask(self, length: int, dtype=mx.float32):
        """The mask of `length` new queries: causal, pads hidden, within the window when one is set."""
        offset, padding, _ = self._layout(length)
        window = self.max_size if self.max_size is not None and offset + length > self.max_size else None
        if not any(padding) and window is None:
            return causal(length)
        return left_padding_mask(mx.array(padding), offset, length, window, dtype)

    def make_positions(self, length: int) -> Positions:
        """Positions of `length` new tokens, per row; one shared range when the rows are aligned."""
        offset, padding, shifts = self._layout(length)
        if not any(padding) and len(set(shifts)) == 1:
            return Positions.range(offset + shifts[0], length)
        end = offset + length + max(shifts)
        return left_padding_positions(mx.array(padding), mx.array(shifts), offset, length, end)

    def filter(self, rows: list[int]) -> None:
        """Keep only `rows` (indices, in the new order); drops the columns no kept row needs."""
        index = mx.array(rows)
        self.keys, self.values = _each(lambda a: a[index], self.keys), _each(lambda a: a[index], self.values)
        self.left_padding = [self.left_padding[i] for i in rows]
        self.shifts = [self.shifts[i] for i in rows]
        self._drop(min(self.left_padding))

    def extract(self, row: int) -> KVCache | RotatingKVCache:
        """Row `row` as a single-row cache (a RotatingKVCache of `max_size` when the batch has a window)."""
        start = self.left_padding[row]
        keys = self.keys[row : row + 1, :, start : self.offset, :]
        values = self.values[row : row + 1, :, start : self.offset, :]
        if self.max_size is None:
            cache = KVCache()
            cache.state = (keys, values)
            return cache
        keys, values = keys[..., -self.max_size :, :], values[..., -self.max_size :, :]
        meta = {"offset": self.offset + self.shifts[row], "max_size": self.max_size}
        return RotatingKVCache.from_state((keys, values), meta)

    def shift_right(self, counts: list[int]) -> None:
        """Move row b's keys `counts[b]` columns right, dropping its last `counts[b]` columns: after a
        prefill of right-padded rows, their pads move to the left, where pads belong."""
        if not any(counts):
            return
        shift = mx.array(counts)
        index = mx.maximum(mx.arange(self.offset)[None] - shift[:, None], 0)[:, None, :, None]
        keys, values = self.state
        self.keys = mx.take_along_axis(keys, index, axis=2)
        self.values = mx.take_along_axis(values, index, axis=2)
        self.left_padding = [p + c for p, c in zip(self.left_padding, counts, strict=True)]
        self.shifts = [s - c for s, c in zip(self.shifts, counts, strict=True)]

    def extend(self, other: BatchKVCache) -> None:
        """Append the rows of `other` after these, both right-aligned to the wider of the two."""
        width = max(self.offset, other.offset)
        if self.keys is None and other.keys is None:  # two empty caches: only the bookkeeping joins
            self.left_padding += other.left_padding
            self.shifts += other.shifts
            return
        like = self if self.keys is not None else other
        keys, values = [], []
        for cache in (self, other):
            pad = width - cache.offset

            def padded(a, pad=pad):
                return (
                    mx.concatenate([mx.zeros((*a.shape[:2], pad, a.shape[3]), a.dtype), a], axis=2)
                    if pad
                    else a
                )

            if cache.keys is None:  # an empty float cache: no columns, the shape of the other's
                _, heads, _, dims = like.keys.shape
                k = mx.zeros((len(cache), heads, 0, dims), like.keys.dtype)
                v = mx.zeros((len(cache), heads, 0, like.values.shape[3]), like.values.dtype)
            else:
                k, v = cache.state
            keys.append(_each(padded, k))
            values.append(_each(padded, v))
        self.left_padding = [p + width - self.offset for p in self.left_padding] + [
            p + width - other.offset for p in other.left_padding
        ]
        self.shifts = [s - (width - self.offset) for s in self.shifts] + [
            s - (width - other.offset) for s in other.shifts
        ]
        if isinstance(keys[0], tuple):
            self.keys, self.values = (
                tuple(map(mx.concatenate, zip(*parts, strict=True))) for parts in (keys, values)
            )
        else:
            self.keys = mx.concatenate(keys, axis=0)
            self.values = mx.concatenate(values, axis=0)
        self.offset = width


class BatchQuantizedKVCache(BatchKVCache, QuantizedKVCache):
    """A batch cache whose keys and values are quantized as `QuantizedKVCache`'s (no window: a rotating
    cache is not quantized); rows join (`extend`) only another quantized batch."""

    def __init__(self, left_padding: list[int], shifts: list[int] | None, group_size: int, bits: int):
        QuantizedKVCache.__init__(self, group_size, bits)
        BatchKVCache.__init__(self, left_padding, shifts)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return QuantizedKVCache.update_and_fetch(self, keys, values)

    state = QuantizedKVCache.state

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> BatchQuantizedKVCache:
        return self
