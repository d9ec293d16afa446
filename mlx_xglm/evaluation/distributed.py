"""Data-parallel scoring under MLX's launcher (`mlx.launch --backend ring -n N -- ...`).

Work is cut into batches the same way whatever the number of processes; rank r computes batches r, r+N,
r+2N, ... and the results are gathered with `mx.distributed.all_gather`, so every rank ends with all of
them, each computed in exactly the batch a single process would have used: results equal one process's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from ..world import all_gather_json, is_main_process, world

T = TypeVar("T")

__all__ = ["all_gather_json", "is_main_process", "run_sharded", "world"]


def run_sharded(
    batches: Sequence,
    work: Callable[[int, object], T],
    group=None,
    on_done: Callable[[object], None] | None = None,
) -> list[T]:
    """`work(index, batch)` for every batch, in order, each computed once across the processes.

    `work` must return what JSON can hold (lists, numbers, strings, booleans). `on_done(batch)` is called
    after each batch this process computes (for progress bars).
    """
    group = world(group)
    size, rank = group.size(), group.rank()
    mine = {}
    for i in range(rank, len(batches), size):
        mine[i] = work(i, batches[i])
        if on_done is not None:
            on_done(batches[i])
    if size == 1:
        return [mine[i] for i in range(len(batches))]
    results = {}
    for part in all_gather_json({str(i): r for i, r in mine.items()}, group):
        results.update(part)
    return [results[str(i)] for i in range(len(batches))]
