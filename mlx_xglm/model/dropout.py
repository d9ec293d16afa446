"""Dropout that can draw its masks from an explicit key, so a recomputed layer redraws the same masks.

In training mode the model draws one key per decoder layer per step and runs the layer inside
`dropout_key(key)`: every `Dropout` called there (the layer's, its attention's, its LoRA adapters') takes
the next key of a sequence split from that one. The masks then depend only on the key and the call order,
so gradient checkpointing, which runs the layer again during the backward pass, sees the same masks.
Outside such a block a `Dropout` is mlx's, drawing from the global generator.

Each row of the batch draws its mask from its own key, split from the call's key by the row's index in the
whole batch (`batch_rows`), so a process that holds rows 4..7 of a batch of 8 draws for them the masks that
one process holding all 8 would: data-parallel training equals one process, dropout included.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import mlx.core as mx
import mlx.nn as nn

# The key sequences of the `dropout_key` blocks being run, innermost last.
_sequences: list[list[mx.array]] = []
# The rows of the whole batch this process holds, innermost block last: (first row's index, batch rows).
_rows: list[tuple[int, int]] = []


def layer_key() -> mx.array:
    """A fresh key drawn from the global generator (advancing it), for one layer's dropout in one step."""
    return mx.random.randint(0, 2**31 - 1, (2,), dtype=mx.uint32)


@contextmanager
def dropout_key(key: mx.array):
    """Make every `Dropout` called inside the block draw from keys split in turn from `key`."""
    _sequences.append([key])
    try:
        yield
    finally:
        _sequences.pop()


@contextmanager
def batch_rows(first: int, total: int):
    """Inside the block, the batches given to `Dropout` are rows `first`, `first + 1`, ... of a batch of
    `total` rows (a process's share of a data-parallel batch); by default a batch is the whole of it."""
    _rows.append((first, total))
    try:
        yield
    finally:
        _rows.pop()


def keyed_call(layer: nn.Module, checkpoint: bool, h: mx.array, *args) -> mx.array:
    """`layer(h, *args)` with its dropout drawn from a fresh key; with `checkpoint` the layer keeps only
    `h` and runs again in the backward pass, the same key giving the same masks."""
    key = layer_key()
    rows = _rows[-1] if _rows else None

    def run(h: mx.array) -> mx.array:
        with dropout_key(key), batch_rows(*rows) if rows else nullcontext():
            return layer(h, *args)

    return nn.utils.checkpoint(layer, run)(h) if checkpoint else run(h)


class Dropout(nn.Dropout):
    """mlx's Dropout, drawing from the innermost `dropout_key` block's sequence when there is one."""

    def __call__(self, x: mx.array) -> mx.array:
        if not _sequences or self._p_1 == 1 or not self.training:
            return super().__call__(x)
        sequence = _sequences[-1]
        sequence[0], key = mx.random.split(sequence[0])
        first, total = _rows[-1] if _rows else (0, x.shape[0])
        keys = mx.random.split(key, total)[first : first + x.shape[0]]
        mask = mx.vmap(lambda k: mx.random.bernoulli(self._p_1, x.shape[1:], key=k))(keys)
        return (mask * x) * (1 / self._p_1)
