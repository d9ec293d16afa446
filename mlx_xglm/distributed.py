"""What every layer of mlx-xglm needs from `mx.distributed` under `mlx.launch`: the process group, JSON
exchanged between ranks, and agreement on errors so that no rank waits forever in a collective."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import numpy as np

from .errors import XGLMError

# What `mlx.launch` exports for each backend: a process that sees one of them was started by the launcher.
LAUNCH_VARIABLES = ("MLX_HOSTFILE", "MLX_WORLD_SIZE", "MLX_IBV_DEVICES", "MLX_JACCL_COORDINATOR")


class AgreedError(XGLMError):
    """An error every rank raises together after `agree`; rank 0 reports it, the others stay silent."""


def world(group=None):
    """The process group to share work over: `group`, or the launcher's (one process when not launched).

    A process that `mlx.launch` started as one of several ranks, but whose MLX has no working backend for
    the launcher's (so it would silently run alone), gets an XGLMError.
    """
    if group is not None:
        return group
    group = mx.distributed.init()
    if group.size() == 1 and launched_size() > 1:
        raise AgreedError(
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
    for name in ("MLX_HOSTFILE", "MLX_IBV_DEVICES"):
        try:
            with open(os.environ[name], encoding="utf-8") as f:
                return max(len(json.load(f)), 1)
        except (KeyError, OSError, ValueError, TypeError):
            continue
    return 1


def is_main_process(group=None) -> bool:
    """True on rank 0, the process that prints and writes."""
    return world(group).rank() == 0


def all_gather_json(value, group) -> list:
    """`value` (anything JSON can hold) from every rank, in rank order; floats round-trip exactly."""
    if group.size() == 1:
        return [json.loads(json.dumps(value))]
    data = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
    sizes = mx.distributed.all_gather(mx.array([data.size], mx.int32), group=group, stream=mx.cpu)
    sizes = np.array(sizes).tolist()
    padded = np.zeros(max(sizes), np.uint8)
    padded[: data.size] = data
    everything = mx.distributed.all_gather(mx.array(padded)[None], group=group, stream=mx.cpu)
    rows = np.array(everything)
    return [json.loads(rows[r, : sizes[r]].tobytes().decode()) for r in range(group.size())]


def agree(group, error: XGLMError | None = None, value=None):
    """Meet the other ranks: raise AgreedError on every rank when any rank brings an `error`, else return
    every rank's `value` (JSON), in rank order.

    The message names the first failing rank. Call it where every rank arrives, with the error a step
    raised caught rather than thrown, so that a rank that failed alone does not leave the others waiting.
    """
    mine = {"error": None if error is None else str(error), "value": value}
    if group.size() == 1:
        if error is not None:
            raise AgreedError(str(error), param=error.param) from None
        return [value]
    everyone = all_gather_json(mine, group)
    for rank, theirs in enumerate(everyone):
        if theirs["error"] is not None:
            prefix = "" if rank == 0 else f"rank {rank}: "
            raise AgreedError(prefix + theirs["error"], param=getattr(error, "param", None)) from None
    return [theirs["value"] for theirs in everyone]


def share_seed(seed: int | None, group) -> int | None:
    """`seed`, or (under mlx.launch without one) a seed rank 0 draws: every rank samples the same tokens."""
    if seed is not None or group.size() == 1:
        return seed
    mine = int(np.random.default_rng().integers(0, 2**31)) if group.rank() == 0 else 0
    return int(mx.distributed.all_sum(mx.array(mine), group=group, stream=mx.cpu).item())
