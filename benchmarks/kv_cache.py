"""Quantized KV caches: their bytes against a float16 cache, and how to attend over quantized keys.

Not part of the test suite. Fills one layer's cache of a preset's shape (heads x head_dim) with --positions
random keys and values and reports, for the whole model (every layer), the bytes of a float16 cache and of
QuantizedKVCache at 8 and 4 bits (group 64). Then times one decoding query's attention over those
positions three ways, alternating: the float cache with the fused kernel, the quantized cache dequantized
then the fused kernel (what QuantizedKVCache does), and mx.quantized_matmul over the packed keys and
values (mlx-lm's quantized SDPA). Appends a markdown table to --output.

    python benchmarks/kv_cache.py --preset 564M --positions 2048
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx
from compare import SHAPES, append_table

from mlx_xglm.model.cache import KVCache, QuantizedKVCache


def mean_ms(fn, repeats: int) -> float:
    mx.eval(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="564M")
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/RESULTS.md"))
    args = parser.parse_args()
    shape = SHAPES[args.preset]
    heads, layers = shape["attention_heads"], shape["num_layers"]
    dim = shape["d_model"] // heads
    dtype = getattr(mx, args.dtype)
    keys = mx.random.normal((1, heads, args.positions, dim), key=mx.random.key(0)).astype(dtype)
    values = mx.random.normal((1, heads, args.positions, dim), key=mx.random.key(1)).astype(dtype)
    query = mx.random.normal((1, heads, 1, dim), key=mx.random.key(2)).astype(dtype)
    scale = dim**-0.5
    fp16 = KVCache()
    fp16.update_and_fetch(keys.astype(mx.float16), values.astype(mx.float16))
    rows = [
        f"Quantized KV caches, {args.preset} shapes ({layers} layers x {heads} heads x {dim} dims), "
        f"{args.positions} positions; attention of one {args.dtype} query per layer, mean of "
        f"{args.repeats} runs, median over {args.trials} alternating trials; {platform.machine()} "
        f"{platform.system()}, MLX {mx.__version__} on {mx.default_device()}; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the start",
        "",
        "| cache | whole-model bytes | vs float16 | float keys: fused SDPA (ms) | dequantize + SDPA (ms) | "
        "quantized_matmul (ms) |",
        "|---|---|---|---|---|---|",
        f"| float16 | {fp16.nbytes * layers / 1e6:.1f} MB | 1.00x | | | |",
    ]
    for bits in (8, 4):
        cache = QuantizedKVCache(64, bits)
        cache.update_and_fetch(keys, values)
        (qk, qv) = cache.state

        def dequantized(qk=qk, qv=qv, bits=bits):
            k = mx.dequantize(*qk, group_size=64, bits=bits).astype(dtype)
            v = mx.dequantize(*qv, group_size=64, bits=bits).astype(dtype)
            return mx.fast.scaled_dot_product_attention(query, k, v, scale=scale)

        def quantized_matmul(qk=qk, qv=qv, bits=bits):
            scores = mx.quantized_matmul(query * scale, *qk, transpose=True, group_size=64, bits=bits)
            probs = mx.softmax(scores.astype(mx.float32), axis=-1).astype(dtype)
            return mx.quantized_matmul(probs, *qv, transpose=False, group_size=64, bits=bits)

        def fused():
            return mx.fast.scaled_dot_product_attention(query, keys, values, scale=scale)

        times = {name: [] for name in ("fused", "dequantized", "quantized_matmul")}
        for _ in range(args.trials):
            for name, fn in (
                ("fused", fused),
                ("dequantized", dequantized),
                ("quantized_matmul", quantized_matmul),
            ):
                times[name].append(mean_ms(fn, args.repeats))
        t = {name: statistics.median(v) for name, v in times.items()}
        rows.append(
            f"| {bits}-bit, group 64 | {cache.nbytes * layers / 1e6:.1f} MB | "
            f"{cache.nbytes / fp16.nbytes:.2f}x | {t['fused']:.2f} | {t['dequantized']:.2f} | "
            f"{t['quantized_matmul']:.2f} |"
        )
    append_table(args.output, rows)


if __name__ == "__main__":
    main()
