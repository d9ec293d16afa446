"""Running a command as one of several ranks of `mlx.launch`: the process group, quiet ranks, --pipeline."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import warnings

import mlx.core as mx

from mlx_xglm.decoding.rows import generation_stream
from mlx_xglm.world import RankFailed, share_seed, world

LAUNCH_NOTE = """
Across processes or machines (rank 0 prints; every rank samples the same tokens):
  mlx.launch --backend ring -n 2 -- mlx-xglm %s ...               # tensor parallel
  mlx.launch --backend ring -n 2 -- mlx-xglm %s --pipeline ...    # each rank a slice of the layers
  mlx.launch --backend ring --hostfile hosts.json -- mlx-xglm %s ...
"""


def add_pipeline_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="under mlx.launch: give each process a slice of the layers instead of a share of every "
        "layer (tensor parallelism, the default)",
    )


def start_ranks():
    """The launcher's process group (one process when not launched); the stdout of ranks other than 0
    goes nowhere, and their warnings are dropped."""
    group = world()
    if group.rank() != 0:
        sys.stdout.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        warnings.simplefilter("ignore")
    return group


def refuse_launched(group, flag: str, value) -> None:
    """Refuse a flag that does not work across processes (every rank raises the same error)."""
    if group.size() > 1 and value:
        raise RankFailed(f"{flag} does not work under mlx.launch yet; run one process for it")


def launched_seed(args: argparse.Namespace, group) -> None:
    """Give every rank the same --seed: rank 0's random one when none was given."""
    args.seed = share_seed(args.seed, group)


def finish_ranks(group) -> None:
    """Wait for this rank's queued work and for every other rank, so that none exits while another still
    needs it (a step queued ahead of the last token is still in flight)."""
    if group.size() > 1:
        mx.synchronize(generation_stream())
        mx.synchronize()
        mx.eval(mx.distributed.all_sum(mx.array(0), group=group, stream=mx.cpu))


def stop_with_launcher() -> None:
    """SIGTERM this process when `mlx.launch` goes away (its end of our stdin closes): a launcher killed
    by SIGTERM, or stopped by Ctrl-C, cannot stop its ranks itself."""

    def watch() -> None:
        with contextlib.suppress(OSError, ValueError):
            while os.read(sys.stdin.fileno(), 4096):
                pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="mlx-xglm-launcher-watch", daemon=True).start()
