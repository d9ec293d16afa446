"""XGLM's fixed sinusoidal position embeddings, as fairseq computes them."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .masks import Positions

# fairseq reserves rows 0 and 1 of the position table (row 1 is the padding row), so the first real token
# reads row 2.
POSITION_OFFSET = 2


def sinusoidal_table(num_positions: int, dim: int, padding_idx: int) -> np.ndarray:
    """fairseq's sinusoid table: sin and cos halves concatenated, computed in float32 like torch."""
    half = dim // 2
    # fairseq divides by (half - 1), not half: the last frequency is exactly 1/10000.
    step = math.log(10000) / (half - 1)
    freqs = np.exp(np.arange(half, dtype=np.float32) * np.float32(-step))
    angles = np.arange(num_positions, dtype=np.float32)[:, None] * freqs[None, :]
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if dim % 2 == 1:
        table = np.concatenate([table, np.zeros((num_positions, 1), np.float32)], axis=1)
    table[padding_idx] = 0.0
    return table


class XGLMSinusoidalPositionalEmbedding(nn.Module):
    """Fixed sinusoidal positions; the table grows on demand instead of failing past its size."""

    def __init__(self, num_positions: int, dim: int, padding_idx: int):
        super().__init__()
        self.dim = dim
        self.padding_idx = padding_idx
        # Underscored: a buffer, not a parameter, so it is neither loaded, saved nor quantized.
        self._table = mx.array(sinusoidal_table(num_positions + POSITION_OFFSET, dim, padding_idx))

    def __call__(self, positions: Positions, dtype=mx.float32) -> mx.array:
        """Rows for `positions` in `dtype`: [L, dim] for a shared range, else [B, L, dim]; the table grows
        to fit, and is cast once per dtype rather than at every step."""
        table = self._rows(positions.end + POSITION_OFFSET, dtype)
        if positions.ids is None:
            return table[positions.start + POSITION_OFFSET : positions.end + POSITION_OFFSET]
        return table[positions.ids + POSITION_OFFSET]

    def _rows(self, needed: int, dtype) -> mx.array:
        if needed > self._table.shape[0]:
            size = max(needed, 2 * self._table.shape[0])
            self._table = mx.array(sinusoidal_table(size, self.dim, self.padding_idx))
        if dtype == self._table.dtype:
            return self._table
        if self.get("_cast") is None or self._cast.dtype != dtype or len(self._cast) != len(self._table):
            self._cast = self._table.astype(dtype)
        return self._cast
