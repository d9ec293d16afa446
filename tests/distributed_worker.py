"""What the distributed tests run in each rank: logits of a checkpoint, one process or sharded.

python distributed_worker.py CHECKPOINT OUT MODE, MODE one of one, tensor, pipeline: writes OUT/MODE.npy
(rank 0: the float32 logits of fixed ids) and OUT/MODE-RANK.json (this rank's peak memory in bytes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_xglm import load, sharded_load

IDS = [[2, 11, 57, 300, 42, 900, 7, 1000]]


def main(checkpoint: str, out: str, mode: str) -> None:
    group = mx.distributed.init()
    if mode == "one":
        model, _ = load(checkpoint)
    else:
        model, _ = sharded_load(checkpoint, **{f"{mode}_group": group})
    logits = model(mx.array(IDS)).astype(mx.float32)
    mx.eval(logits)
    if group.rank() == 0:
        np.save(Path(out) / f"{mode}.npy", np.array(logits))
    peak = {"peak_memory": mx.get_peak_memory()}
    (Path(out) / f"{mode}-{group.rank()}.json").write_text(json.dumps(peak))


if __name__ == "__main__":
    main(*sys.argv[1:])
