"""Decode speed of `mlx-xglm bench` with each BLAS library MLX's CPU matmuls can use on Linux.

Not part of the test suite. Runs `mlx-xglm bench --json` in a fresh process per trial, alternating Intel
MKL (pip install mkl; LD_PRELOAD=<venv>/lib/libmkl_rt.so.3), Debian's OpenBLAS (libopenblas0-pthread)
and the reference BLAS the mlx[cpu] wheel bundles (no preload); each process must exit on its own within
the timeout (a preloaded OpenBLAS once hung at exit). Appends a markdown table to --output.

    python benchmarks/blas.py --layers 4 --gen-tokens 16 --trials 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from compare import append_table

LIBRARIES = {
    "Intel MKL": Path(sys.prefix) / "lib" / "libmkl_rt.so.3",
    "OpenBLAS": Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"),
    "reference BLAS": None,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="564M")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--gen-tokens", type=int, default=16)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/RESULTS.md"))
    args = parser.parse_args()
    flags = ["--preset", args.preset, "--layers", args.layers, "--prompt-tokens", args.prompt_tokens]
    flags += ["--gen-tokens", args.gen_tokens, "--trials", 1, "--json"]
    command = [sys.executable, "-m", "mlx_xglm.cli", "bench", *map(str, flags)]
    results = {name: [] for name, path in LIBRARIES.items() if path is None or path.exists()}
    loaded = {}
    for trial in range(args.trials):
        for name in results:
            env = dict(os.environ)
            env.pop("LD_PRELOAD", None)
            if LIBRARIES[name] is not None:
                env["LD_PRELOAD"] = str(LIBRARIES[name])
            out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
            if out.returncode != 0:
                raise SystemExit(f"{name}: exit {out.returncode}\n{out.stderr}")
            summary = json.loads(out.stdout)
            results[name].append(summary)
            loaded[name] = summary["blas"]
            print(f"trial {trial + 1} {name}: decode {summary['generation_tps']:.2f} tok/s", flush=True)
    base = statistics.median(r["generation_tps"] for r in results["reference BLAS"])
    rows = [
        f"BLAS libraries, `mlx-xglm bench --preset {args.preset} --layers {args.layers} --prompt-tokens "
        f"{args.prompt_tokens} --gen-tokens {args.gen_tokens}` (float32), one process per trial, median of "
        f"{args.trials} alternating trials, every process exited on its own; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end",
        "",
        "| library (as bench reports it) | prompt tok/s | decode tok/s | decode vs reference |",
        "|---|---|---|---|",
    ]
    for name, summaries in results.items():
        decode = statistics.median(r["generation_tps"] for r in summaries)
        prompt = statistics.median(r["prompt_tps"] for r in summaries)
        rows.append(f"| {loaded[name]} | {prompt:.1f} | {decode:.2f} | {decode / base:.2f}x |")
    append_table(args.output, rows)


if __name__ == "__main__":
    main()
