"""Strided perplexity: `mlx_xglm.perplexity` against transformers' strided loop, on the same weights.

Both score the same TOKENS random ids (a leading `</s>`, then ids drawn with a fixed seed) with Hugging Face's
strided method (windows of `--context-length` tokens every `--stride`), on random weights of a released
checkpoint's shape cut to `--layers` layers; the weights are drawn once in MLX and copied into
transformers' XGLMForCausalLM, so both print the same perplexity. Trials alternate, each backend in a fresh
process; torch runs without the OpenBLAS preload meant for MLX. Example, 564M widths with 3 layers:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/perplexity_compare.py --preset 564M --layers 3 --trials 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import mlx.core as mx
import numpy as np
from compare import alternating_trials, describe_ratios, paired_ratios

from mlx_xglm.bench import random_model
from mlx_xglm.evaluation import perplexity


class _Ids:
    """A stand-in tokenizer whose text is already ids: the benchmark measures scoring, not encoding."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    def encode(self, text, newlines=None) -> list[int]:
        return self.ids


def token_ids(args: argparse.Namespace, vocab_size: int) -> list[int]:
    return [2] + np.random.default_rng(0).integers(4, vocab_size, args.tokens - 1).tolist()


def build(args: argparse.Namespace):
    mx.random.seed(0)
    return random_model(args.preset, layers=args.layers)


def measure_mlx(args: argparse.Namespace) -> dict:
    model = build(args)
    ids = token_ids(args, model.config.vocab_size)
    start = time.perf_counter()
    result = perplexity(model, _Ids(ids), "", context_length=args.context_length, stride=args.stride)
    return {"seconds": time.perf_counter() - start, "perplexity": result.perplexity}


def measure_torch(args: argparse.Namespace) -> dict:
    """Hugging Face's strided loop (the perplexity guide's), one window per forward, under no_grad."""
    import torch
    import transformers
    from mlx.utils import tree_flatten

    model = build(args)
    known = transformers.XGLMConfig().to_dict()
    config = transformers.XGLMConfig(**{k: v for k, v in vars(model.config).items() if k in known})
    weights = {k: torch.from_numpy(np.array(v)) for k, v in tree_flatten(model.parameters()) if "._" not in k}
    ids = token_ids(args, model.config.vocab_size)
    del model
    ref = transformers.XGLMForCausalLM(config).eval()
    missing, _ = ref.load_state_dict(weights, strict=False)
    assert all("embed_positions" in name or name == "lm_head.weight" for name in missing), missing
    tokens = torch.tensor([ids])
    start = time.perf_counter()
    nll, counted, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), args.stride):
        end = min(begin + args.context_length, len(ids))
        scored = end - prev_end
        window = tokens[:, begin:end]
        labels = window.clone()
        labels[:, :-scored] = -100
        with torch.no_grad():
            loss = ref(window, labels=labels).loss
        valid = int((labels[:, 1:] != -100).sum())
        nll += loss.item() * valid
        counted += valid
        prev_end = end
        if end == len(ids):
            break
    return {"seconds": time.perf_counter() - start, "perplexity": math.exp(nll / counted)}


def compare(args: argparse.Namespace) -> None:
    results = alternating_trials(__file__, args, PASSED)
    ours = statistics.median(r["seconds"] for r in results["mlx"])
    theirs = statistics.median(r["seconds"] for r in results["torch"])
    blas = (
        "OpenBLAS preloaded for MLX" if "openblas" in os.environ.get("LD_PRELOAD", "") else "MLX's own BLAS"
    )
    print(
        f"{args.preset} widths, {args.layers} layers, float32, {args.tokens} tokens, context "
        f"{args.context_length}, stride {args.stride}, {platform.machine()} {mx.default_device()}, {blas}; "
        f"{args.trials} alternating trials, medians:"
    )
    print(f"mlx-xglm perplexity(): {ours:.1f} s, perplexity {results['mlx'][0]['perplexity']:.6g}")
    print(f"transformers strided loop: {theirs:.1f} s, perplexity {results['torch'][0]['perplexity']:.6g}")
    print(f"speed, mlx-xglm / transformers: {theirs / ours:.2f}x")
    ratios = paired_ratios(results, lambda r: 1 / r["seconds"])
    print(f"paired, mlx-xglm / transformers: {describe_ratios(ratios)}", flush=True)


PASSED = ("preset", "layers", "tokens", "context_length", "stride")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="564M")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4613)
    parser.add_argument("--context-length", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--trials", type=int, default=2, help="alternating trials of each backend")
    parser.add_argument("--backend", choices=["mlx", "torch"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend is None:
        compare(args)
    else:
        result = (measure_torch if args.backend == "torch" else measure_mlx)(args)
        print(json.dumps(result), flush=True)
    # A preloaded OpenBLAS can hang in its thread shutdown at exit (see README); the output is complete.
    os._exit(0)


if __name__ == "__main__":
    main()
