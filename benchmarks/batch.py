"""Decode speed of the engine: one row against the previous main, and 8 rows against 1 row.

Not part of the test suite. Each trial runs in a fresh process that imports mlx_xglm from the given source
tree, builds a model with random weights of the given shape and times greedy decoding; trials alternate
between the contenders so machine noise hits them alike. Ratios within one run are what to report.

    git worktree add /tmp/oldmain 6a04d3d
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python benchmarks/batch.py --old /tmp/oldmain --trials 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def build_model(args):
    import mlx.core as mx

    from mlx_xglm import XGLMConfig, XGLMForCausalLM

    mx.random.seed(0)
    config = XGLMConfig(
        vocab_size=args.vocab_size,
        d_model=args.d_model,
        ffn_dim=4 * args.d_model,
        num_layers=args.layers,
        attention_heads=args.d_model // 64,
    )
    model = XGLMForCausalLM(config)
    model.eval()
    mx.eval(model.parameters())
    return model


def single(args) -> float:
    """Decode tokens/s of `generate_step` for one prompt (the first token, read with the prompt, excluded)."""
    import mlx.core as mx

    from mlx_xglm import generate_step

    model = build_model(args)
    prompt = mx.random.randint(4, args.vocab_size, (args.prompt_tokens,))
    steps = generate_step(prompt, model, max_tokens=args.gen_tokens)
    next(steps)
    tic = time.perf_counter()
    count = sum(1 for _ in steps)
    return count / (time.perf_counter() - tic)


def batched(args) -> float:
    """Aggregate decode tokens/s of `BatchGenerator` over `args.rows` prompts (the prefill call excluded)."""
    import mlx.core as mx

    from mlx_xglm import BatchGenerator

    model = build_model(args)
    prompts = mx.random.randint(4, args.vocab_size, (args.rows, args.prompt_tokens)).tolist()
    gen = BatchGenerator(model, max_tokens=args.gen_tokens)
    gen.insert(prompts)
    gen.next()
    tic = time.perf_counter()
    count = 0
    while responses := gen.next():
        count += len(responses)
    return count / (time.perf_counter() - tic)


def run(source: Path, mode: str, args, rows: int = 1) -> float:
    """One trial in a fresh process importing mlx_xglm from `source`."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        "--rows",
        str(rows),
        *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SHAPE],
    ]
    env = {**os.environ, "PYTHONPATH": str(source)}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True, cwd=source)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(result["module"]).is_relative_to(source):
        raise SystemExit(f"the trial for {source} imported mlx_xglm from {result['module']}")
    return result["tps"]


SHAPE = ["layers", "d_model", "vocab_size", "prompt_tokens", "gen_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", type=Path, help="source tree of the previous main (a git worktree)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=256008)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--worker", choices=["single", "batched"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import mlx_xglm

        tps = single(args) if args.worker == "single" else batched(args)
        print(json.dumps({"tps": tps, "module": mlx_xglm.__file__}))
        return

    results: dict[str, list[float]] = {}
    contenders = [("new generate_step, 1 row", HERE, "single", 1)]
    if args.old:
        contenders.insert(0, ("old generate_step, 1 row", args.old.resolve(), "single", 1))
    contenders += [
        ("BatchGenerator, 1 row", HERE, "batched", 1),
        (f"BatchGenerator, {args.rows} rows", HERE, "batched", args.rows),
    ]
    for _ in range(args.trials):
        for name, source, mode, rows in contenders:
            results.setdefault(name, []).append(run(source, mode, args, rows))
    shape = ", ".join(f"{k}={getattr(args, k)}" for k in SHAPE)
    print(f"Decode tokens/s (aggregate over rows), median of {args.trials} alternating trials; {shape}")
    for name, values in results.items():
        print(f"  {name:32s} {statistics.median(values):9.1f}   trials: {[round(v, 1) for v in values]}")
    median = {name: statistics.median(values) for name, values in results.items()}
    if args.old:
        ratio = median["new generate_step, 1 row"] / median["old generate_step, 1 row"]
        print(f"  single row, new / old main: {ratio:.2f}x")
    batch = median[f"BatchGenerator, {args.rows} rows"] / median["BatchGenerator, 1 row"]
    print(f"  {args.rows} rows / 1 row (BatchGenerator): {batch:.2f}x")


if __name__ == "__main__":
    main()
