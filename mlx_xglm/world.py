"""The processes of a run under MLX's launcher (`mlx.launch --backend ring -n N -- ...`): which group,
which rank prints and writes, and how the ranks agree that one of them failed.

A rank that fails alone must not leave the others waiting forever in their next collective: steps that
can fail on one rank only (reading files, writing the adapter) run inside `agree`, which tells every rank
of any rank's failure, so all of them stop with the same error. Rank 0 reports it; the others raise
`RankFailed`, which the command line turns into a quiet non-zero exit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TypeVar

import mlx.core as mx
import numpy as np

from .errors import XGLMError

T = TypeVar("T")


class RankFailed(XGLMError):
    """A failure every rank agreed on: rank 0 reports it, the other ranks leave without a word."""


# What `mlx.launch` exports for each backend: a process that sees one of them was started by the launcher.
LAUNCH_SIZE_FILES = ("MLX_HOSTFILE", "MLX_IBV_DEVICES")


def world(group=None):
    """The process group to share work over: `group`, or the launcher's (one process when not launched).

    A process that `mlx.launch` started as one of several ranks, but whose MLX has no working backend for
    the launcher's (so that it would silently run alone), gets a RankFailed: every rank meets the same.
    """
    if group is not None:
        return group
    group = mx.distributed.init()
    if group.size() == 1 and launched_size() > 1:
        raise RankFailed(
            f"mlx.launch started this process as rank {os.environ.get('MLX_RANK')} of {launched_size()}, "
            "but this MLX has no working distributed backend for it (ring, mpi or jaccl); check the "
            "launcher's --backend and that every host runs the same MLX build"
        )
    return group


def launched_size() -> int:
    """How many ranks `mlx.launch` says it started (1 when not launched)."""
    if "MLX_RANK" not in os.environ:
        return 1
    if os.environ.get("MLX_WORLD_SIZE", "").isdigit():
        return int(os.environ["MLX_WORLD_SIZE"])
    for name in LAUNCH_SIZE_FILES:
        try:
            with open(os.environ[name], encoding="utf-8") as f:
                return max(len(json.load(f)), 1)
        except (KeyError, OSError, ValueError, TypeError):
            continue
    return 1


def is_quiet_rank() -> bool:
    """True in a launched rank other than 0: it leaves a RankFailed without a word (rank 0 reports it)."""
    return os.environ.get("MLX_RANK", "0") != "0"


def share_seed(seed: int | None, group) -> int | None:
    """`seed`, or (on several ranks, without one) a seed rank 0 draws: every rank samples the same tokens."""
    if seed is not None or group.size() == 1:
        return seed
    mine = int(np.random.default_rng().integers(0, 2**31)) if group.rank() == 0 else 0
    return int(mx.distributed.all_sum(mx.array(mine), group=group, stream=mx.cpu).item())


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
