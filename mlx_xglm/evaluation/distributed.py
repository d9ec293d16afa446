"""Data-parallel scoring under MLX's launcher (`mlx.launch --backend ring -n N -- ...`).

Work is cut into batches the same way whatever the number of processes; rank r computes batches r, r+N,
r+2N, ... and the results are gathered with `mx.distributed.all_gather`, so every rank ends with all of
them, each computed in exactly the batch a single process would have used: results equal one process's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TypeVar

import mlx.core as mx
import numpy as np

T = TypeVar("T")


def world(group=None):
    """The process group to share work over: `group`, or the launcher's (one process when not launched)."""
    return group if group is not None else mx.distributed.init()


def is_main_process(group=None) -> bool:
    """True on rank 0, the process that prints and writes."""
    return world(group).rank() == 0


def all_gather_json(value, group) -> list:
    """`value` (anything JSON can hold) from every rank, in rank order; floats round-trip exactly."""
    data = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
    sizes = mx.distributed.all_gather(mx.array([data.size], mx.int32), group=group, stream=mx.cpu)
    sizes = np.array(sizes).tolist()
    padded = np.zeros(max(sizes), np.uint8)
    padded[: data.size] = data
    everything = mx.distributed.all_gather(mx.array(padded)[None], group=group, stream=mx.cpu)
    rows = np.array(everything)
    return [json.loads(rows[r, : sizes[r]].tobytes().decode()) for r in range(group.size())]


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
