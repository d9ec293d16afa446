"""Per-layer key/value caches, preallocated in steps and written in place."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of one attention layer, [B, heads, S, head_dim], grown `step` positions at a time.

    Follows mlx-lm's cache protocol: `offset`, `update_and_fetch(keys, values)`, `state`.
    """

    step = 256

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev = self.offset
        needed = prev + keys.shape[2]
        if self.keys is None or needed > self.keys.shape[2]:
            B, H, _, D = keys.shape
            grow = ((keys.shape[2] + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, grow, D), keys.dtype)
            new_v = mx.zeros((B, H, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.offset = needed
        self.keys[..., prev:needed, :] = keys
        self.values[..., prev:needed, :] = values
        return self.keys[..., :needed, :], self.values[..., :needed, :]

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, value: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = value
        self.offset = self.keys.shape[2]

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the last `n` positions (at most all of them); returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes
