"""LoRA training speed and peak memory on random weights of a released checkpoint's shape.

Runs the real training loop (`mlx_xglm.tuning.train`: the model's own loss, Adam, dropout in training mode)
on random token rows and prints tokens/s (scored tokens, as `mlx-xglm lora` reports them) and MLX's peak
memory. With `--compare`, trials alternate, each in a fresh process, with transformers + peft training the
same LoRA (same shapes, targets, rank, Adam) on torch, which runs without the OpenBLAS preload meant for
MLX. Example, XGLM-564M widths with 4 layers, batch 4, float32 on the CPU with OpenBLAS preloaded:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/lora_train.py --preset 564M --layers 4 --batch-size 4 --seq-len 128 --compare
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import mlx.core as mx
import numpy as np
from compare import alternating_trials, describe_ratios, paired_ratios

from mlx_xglm.bench import PRESETS, random_model
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
        iters=args.steps + 1,
        batch_size=args.batch_size,
        val_batches=0,
        steps_per_report=1,
        save_every=10**9,
        grad_checkpoint=args.grad_checkpoint,
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


def measure_torch(args: argparse.Namespace) -> dict:
    """The same LoRA run in transformers + peft: forward with labels, backward, Adam step."""
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    shape = {**PRESETS[args.preset], "num_layers": args.layers}
    model = transformers.XGLMForCausalLM(transformers.XGLMConfig(**shape))
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    config = peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(model, config).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(4, model.config.vocab_size, (args.batch_size, args.seq_len))
    speeds = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        speeds.append(args.batch_size * (args.seq_len - 1) / (time.perf_counter() - start))
    return {"tokens_per_second": statistics.median(speeds[1:]), "peak_memory_gb": None}


def compare(args: argparse.Namespace) -> None:
    """Alternate fresh-process trials of both backends; print the medians and their ratio."""
    results = alternating_trials(__file__, args, PASSED, "--json")
    mlx = statistics.median(r["tokens_per_second"] for r in results["mlx"])
    torch = statistics.median(r["tokens_per_second"] for r in results["torch"])
    memory = max(r["peak_memory_gb"] for r in results["mlx"])
    print(f"{describe(args)}; {args.trials} alternating trials of {args.steps} steps, medians:")
    print(f"mlx-xglm: {mlx:.1f} tokens/s, peak memory {memory:.3f} GB")
    print(f"transformers + peft (torch {torch_version()}): {torch:.1f} tokens/s")
    print(f"mlx-xglm / transformers + peft: {mlx / torch:.2f}x")
    ratios = paired_ratios(results, lambda r: r["tokens_per_second"])
    print(f"paired, mlx-xglm / transformers + peft: {describe_ratios(ratios)}", flush=True)


PASSED = ("preset", "layers", "dtype", "q_bits", "batch_size", "seq_len", "steps", "rank")


def torch_version() -> str:
    import torch

    return torch.__version__


def describe(args: argparse.Namespace) -> str:
    blas = (
        "OpenBLAS preloaded for MLX" if "openblas" in os.environ.get("LD_PRELOAD", "") else "MLX's own BLAS"
    )
    base = f"{args.q_bits}-bit" if args.q_bits else args.dtype
    return (
        f"{args.preset} widths, {args.layers} layers, {base}, batch {args.batch_size} x {args.seq_len} "
        f"tokens, rank {args.rank}, {platform.machine()} {mx.default_device()}, {blas}"
        + (", gradient checkpointing" if getattr(args, "grad_checkpoint", False) else "")
    )


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
    parser.add_argument(
        "--grad-checkpoint", action="store_true", help="recompute layers in the backward pass"
    )
    parser.add_argument("--compare", action="store_true", help="alternate with transformers + peft on torch")
    parser.add_argument("--trials", type=int, default=3, help="alternating trials with --compare")
    parser.add_argument("--backend", choices=["mlx", "torch"], default="mlx", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare and args.grad_checkpoint:
        parser.error("--grad-checkpoint measures mlx-xglm alone; leave out --compare")
    if args.compare:
        compare(args)
    else:
        result = (measure_torch if args.backend == "torch" else measure)(args)
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(describe(args))
            print(
                f"trainable {result['trainable'] / 1e6:.2f}M of {result['total'] / 1e6:.1f}M parameters; "
                f"{result['tokens_per_second']:.1f} tokens/s (median of {args.steps} steps), "
                f"peak memory {result['peak_memory_gb']:.3f} GB",
                flush=True,
            )
    # A preloaded OpenBLAS can hang at exit (docs/performance.md); the output is complete.
    os._exit(0)


if __name__ == "__main__":
    main()
