"""What `eval` and `perplexity` share: the process group under mlx.launch, quiet ranks, flag names."""

from __future__ import annotations

import logging
import os
import warnings

import mlx.core as mx

from .render import Renderer

LAUNCH_NOTE = """
Across processes or machines (data parallel, results equal to one process; rank 0 prints and writes):
  mlx.launch --backend ring -n 2 -- mlx-xglm %s ...
  mlx.launch --backend ring --hostfile hosts.json -- mlx-xglm %s ...
"""


def start_group():
    """The launcher's process group (one process when not launched); ranks other than 0 stay silent."""
    group = mx.distributed.init()
    if group.rank() != 0:
        os.environ["TQDM_DISABLE"] = "1"
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
    return group


def quiet_renderer(group) -> Renderer:
    """A renderer whose spinner only rank 0 shows."""
    return Renderer(quiet=group.rank() != 0)
