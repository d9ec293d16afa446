"""LoRA training speed and peak memory on random weights of a released checkpoint's shape.

Runs the real training loop (`mlx_xglm.tuning.train`: the model's own loss, Adam, dropout in training mode)
on random token rows and prints tokens/s (scored tokens, as `mlx-xglm lora` reports them) and MLX's peak
memory. Example, XGLM-564M widths with 4 layers, batch 4, float32 on the CPU with OpenBLAS preloaded:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/lora_train.py --preset 564M --layers 4 --batch-size 4 --seq-len 128
"""

from __future__ import annotations

import argparse
import os
import platform

import mlx.core as mx
import numpy as np

from mlx_xglm.bench import random_model
from mlx_xglm.tuning import Example, TrainingArgs, apply_lora, lora_config, train, trainable_parameters


def measure(args: argparse.Namespace) -> dict:
    model = random_model(args.preset, layers=args.layers, dtype=args.dtype, q_bits=args.q_bits)
    apply_lora(model, lora_config(model, rank=args.rank))
    trainable, total = trainable_parameters(model)
    rng = np.random.default_rng(0)
    rows = [
        Example(rng.integers(4, model.config.vocab_size, args.seq_len).tolist(), 0)
        for _ in range(args.batch_size * (args.steps + 1))
    ]
    reports = []
    mx.reset_peak_memory()
    train_args = TrainingArgs(
        iters=args.steps + 1, batch_size=args.batch_size, val_batches=0, steps_per_report=1, save_every=10**9
    )
    train(model, rows, rows, train_args, save=lambda it: None, callback=reports.append)
    # The first step pays for allocations and warm-up; report the rest.
    speeds = [r.tokens_per_second for r in reports if r.kind == "train"][1:]
    return {
        "tokens_per_second": float(np.median(speeds)),
        "peak_memory_gb": max(r.peak_memory for r in reports if r.kind == "train"),
        "trainable": trainable,
        "total": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="564M")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--q-bits", type=int, default=None, help="QLoRA: quantize the base first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    result = measure(args)
    blas = "OpenBLAS preloaded" if "openblas" in os.environ.get("LD_PRELOAD", "") else "MLX's own BLAS"
    base = f"{args.q_bits}-bit" if args.q_bits else args.dtype
    print(
        f"{args.preset} widths, {args.layers} layers, {base}, batch {args.batch_size} x {args.seq_len} "
        f"tokens, rank {args.rank}, {platform.machine()} {mx.default_device()}, {blas}"
    )
    print(
        f"trainable {result['trainable'] / 1e6:.2f}M of {result['total'] / 1e6:.1f}M parameters; "
        f"{result['tokens_per_second']:.1f} tokens/s (median of {args.steps} steps), "
        f"peak memory {result['peak_memory_gb']:.3f} GB",
        flush=True,
    )
    # A preloaded OpenBLAS can hang in its thread shutdown at exit (see README); the output is complete.
    os._exit(0)


if __name__ == "__main__":
    main()
