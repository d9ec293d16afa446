"""The processes of a run under MLX's launcher (`mlx.launch --backend ring -n N -- ...`): which group,
which rank prints and writes, and how the ranks agree that one of them failed.

A rank that fails alone must not leave the others waiting forever in their next collective: steps that
can fail on one rank only (reading files, writing the adapter) run inside `agree`, which tells every rank
of any rank's failure, so all of them stop with the same error. Rank 0 reports it; the others raise
`RankFailed`, which the command line turns into a quiet non-zero exit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeVar

import mlx.core as mx
import numpy as np

from .errors import XGLMError

T = TypeVar("T")


class RankFailed(XGLMError):
    """A failure every rank agreed on: rank 0 reports it, the other ranks leave without a word."""


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


def agree(action: Callable[[], T], group=None) -> T:
    """`action()` on this rank; if it raised on any rank, every rank raises.

    Rank 0 raises its own exception, or a `RankFailed` naming the first failing rank and its message;
    the other ranks raise `RankFailed`. On one process `action` just runs. Every rank must call `agree`
    at the same point of the run: it is a collective.
    """
    group = world(group)
    if group.size() == 1:
        return action()
    try:
        result, error = action(), None
    except Exception as e:
        result, error = None, e
    failed = mx.distributed.all_sum(mx.array(int(error is not None)), group=group, stream=mx.cpu).item()
    if not failed:
        return result
    reports = all_gather_json(_report(error) if error is not None else None, group)
    rank, (message, param) = next((r, report) for r, report in enumerate(reports) if report is not None)
    if group.rank() == 0 and error is not None:
        raise error
    raise RankFailed(f"rank {rank}: {message}", param=param) from error


def check_same(value, what: str, group=None) -> None:
    """Raise `RankFailed` on every rank unless `value` (JSON-able) is the same on all of them; `what`
    names it in the message ("the training data")."""
    group = world(group)
    if group.size() == 1:
        return
    values = all_gather_json(value, group)
    differing = [r for r, v in enumerate(values) if v != values[0]]
    if differing:
        raise RankFailed(f"rank {differing[0]} has different {what} from rank 0; give every rank the same")


def _report(error: Exception) -> tuple[str, str | None]:
    """The message and parameter of a failure, worded as the command line words it."""
    if isinstance(error, XGLMError):
        return str(error), error.param
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror, None
    return f"{type(error).__name__}: {error}", None
