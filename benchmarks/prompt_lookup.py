"""Prompt-lookup decoding against plain decoding, where the lookups are right and where they are wrong.

Not part of the test suite. No real weights can be read here (no Hub), so the two regimes are built from
random weights of a preset's shape: `copying`, the random model as drawn, whose greedy output soon repeats
its last token, so copied n-grams are accepted as a copy-heavy task's would be; `not copying`, the same
model with unscaled embeddings and attention and MLP outputs scaled 4x (tests/conftest.py's lively
model), whose output changes token to token, so almost every copy is rejected and the cost of checking
them shows. The prompt repeats a random text, so lookups find matches in both. Trials alternate plain
and prompt-lookup decoding in one process; the tokens of both are checked to be the same. Appends a
markdown table to --output.

    LD_PRELOAD=$VIRTUAL_ENV/lib/libmkl_rt.so.3 python benchmarks/prompt_lookup.py --preset 564M --layers 4

Checking k copied tokens is one pass over k + 1 positions: with an optimized BLAS (MKL, OpenBLAS) that
costs little more than one decoding step; with the reference BLAS of the mlx[cpu] wheel it costs about
k + 1 steps, and prompt lookup (like speculative decoding) cannot pay there.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx
from compare import append_table

from mlx_xglm import generate_step
from mlx_xglm.bench import blas_library, random_model
from mlx_xglm.decoding.prompt_lookup import prompt_lookup_generate_step


def timed(steps) -> tuple[float, list[int], int]:
    """Decode tokens/s after the first token, the tokens, and how many came from accepted lookups."""
    out = [next(steps)]
    start = time.perf_counter()
    out += list(steps)
    seconds = time.perf_counter() - start
    return (len(out) - 1) / seconds, [o[0] for o in out], sum(bool(o[2:] and o[2]) for o in out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="564M")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--num-tokens", type=int, default=10, help="prompt_lookup_num_tokens")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="a random text, given twice")
    parser.add_argument("--gen-tokens", type=int, default=48)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/RESULTS.md"))
    args = parser.parse_args()

    model = random_model(args.preset, args.layers)
    text = mx.random.randint(4, model.config.vocab_size, (args.prompt_tokens,), key=mx.random.key(0))
    prompt = mx.concatenate([mx.array([2]), text, text])
    rows = []
    for regime in ("copying", "not copying"):
        if regime == "not copying":
            model.model.embed_scale = 1.0
            for layer in model.layers:
                layer.self_attn.out_proj.weight *= 4
                layer.fc2.weight *= 4
            mx.eval(model.parameters())
        plain_tps, lookup_tps, same, from_lookup = [], [], True, 0
        for trial in range(args.trials):
            tps, plain_tokens, _ = timed(generate_step(prompt, model, max_tokens=args.gen_tokens))
            plain_tps.append(tps)
            steps = prompt_lookup_generate_step(
                prompt, model, max_tokens=args.gen_tokens, prompt_lookup_num_tokens=args.num_tokens
            )
            tps, tokens, from_lookup = timed(steps)
            lookup_tps.append(tps)
            same = same and tokens == plain_tokens
            print(f"{regime} trial {trial + 1}: plain {plain_tps[-1]:.2f} tok/s, lookup {tps:.2f} tok/s")
        plain, lookup = statistics.median(plain_tps), statistics.median(lookup_tps)
        rows.append(
            f"| {regime} | {plain:.2f} | {lookup:.2f} | {from_lookup}/{args.gen_tokens} | "
            f"{lookup / plain:.2f}x | {'yes' if same else 'NO'} |"
        )
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    append_table(
        args.output,
        [
            f"Prompt-lookup decoding (prompt_lookup_num_tokens {args.num_tokens}, max_matching_ngram_size "
            f"2), {args.preset} shapes with {args.layers} layers, float32 random weights; a "
            f"{args.prompt_tokens}-token random text given twice as the prompt, {args.gen_tokens} greedy "
            f"tokens, decode tok/s after the first token, median of {args.trials} alternating trials in one "
            f"process; {platform.machine()} {platform.system()}, MLX {mx.__version__} on "
            f"{mx.default_device()}, {blas_library()}; load average "
            f"{' '.join(f'{x:.2f}' for x in load)} at the end",
            "",
            "| regime | plain tok/s | prompt lookup tok/s | tokens from lookups | speedup | same tokens |",
            "|---|---|---|---|---|---|",
            *rows,
        ],
    )


if __name__ == "__main__":
    main()
