"""Prompt-lookup decoding against plain decoding, and what checking k copied tokens costs.

Not part of the test suite. No real weights can be read here (no Hub), and random weights of a released
shape repeat their last token, so lookups are right about every token after the first few: the first
table is the copying regime (a copy-heavy task at best), timed end to end against plain decoding with the
tokens of both checked to be the same, trials alternating in one process. Where lookups are wrong or find
nothing, the cost is that of one pass over the pending token and the k proposals: the second table gives
that pass's time against one decoding step, which with the acceptance rate gives the gain on any text
(no match: no proposals, a plain step). Appends markdown tables to --output.

    LD_PRELOAD=$VIRTUAL_ENV/lib/libmkl_rt.so.3 python benchmarks/prompt_lookup.py --preset 564M --layers 4

With the reference BLAS of the mlx[cpu] wheel a pass over k + 1 positions costs about k + 1 steps (its
matrix products run at matrix-vector speed), and prompt lookup, like speculative decoding, cannot pay there.
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

from mlx_xglm import generate_step, make_prompt_cache
from mlx_xglm.bench import blas_library, random_model
from mlx_xglm.decoding.prompt_lookup import prompt_lookup_generate_step


def timed(steps) -> tuple[float, list[int], int]:
    """Decode tokens/s after the first token, the tokens, and how many came from accepted lookups."""
    out = [next(steps)]
    start = time.perf_counter()
    out += list(steps)
    seconds = time.perf_counter() - start
    return (len(out) - 1) / seconds, [o[0] for o in out], sum(bool(o[2:] and o[2]) for o in out)


def pass_costs(model, prompt: mx.array, most: int, trials: int) -> dict[int, float]:
    """Median ms of one pass over 1, 2, 5 and `most` + 1 new positions after `prompt`, cache trimmed back."""
    cache = make_prompt_cache(model)
    mx.eval(model(prompt[None], cache=cache))
    sizes = sorted({1, 2, 5, most + 1})
    times = {n: [] for n in sizes}
    for _ in range(trials + 1):  # the first round warms up
        for n in sizes:
            start = time.perf_counter()
            mx.eval(model(prompt[None, :n], cache=cache, logits_to_keep=n))
            times[n].append((time.perf_counter() - start) * 1e3)
            for layer in cache:
                layer.trim(n)
    return {n: statistics.median(t[1:]) for n, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="564M")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--num-tokens", type=int, nargs="+", default=[4, 10], help="prompt_lookup_num_tokens")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="a random text, given twice")
    parser.add_argument("--gen-tokens", type=int, default=48)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/RESULTS.md"))
    args = parser.parse_args()

    model = random_model(args.preset, args.layers)
    text = mx.random.randint(4, model.config.vocab_size, (args.prompt_tokens,), key=mx.random.key(0))
    prompt = mx.concatenate([mx.array([2]), text, text])
    rows = []
    for num_tokens in args.num_tokens:
        plain_tps, lookup_tps, same, from_lookup = [], [], True, 0
        for trial in range(args.trials):
            tps, plain_tokens, _ = timed(generate_step(prompt, model, max_tokens=args.gen_tokens))
            plain_tps.append(tps)
            steps = prompt_lookup_generate_step(
                prompt, model, max_tokens=args.gen_tokens, prompt_lookup_num_tokens=num_tokens
            )
            tps, tokens, from_lookup = timed(steps)
            lookup_tps.append(tps)
            same = same and tokens == plain_tokens
            print(
                f"N={num_tokens} trial {trial + 1}: plain {plain_tps[-1]:.2f} tok/s, lookup {tps:.2f} tok/s"
            )
        plain, lookup = statistics.median(plain_tps), statistics.median(lookup_tps)
        rows.append(
            f"| {num_tokens} | {plain:.2f} | {lookup:.2f} | {from_lookup}/{args.gen_tokens} | "
            f"{lookup / plain:.2f}x | {'yes' if same else 'NO'} |"
        )
    costs = pass_costs(model, prompt, max(args.num_tokens), args.trials)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    append_table(
        args.output,
        [
            f"Prompt-lookup decoding (max_matching_ngram_size 2), {args.preset} shapes with {args.layers} "
            "layers, float32 random weights; a "
            f"{args.prompt_tokens}-token random text given twice as the prompt, {args.gen_tokens} greedy "
            f"tokens, decode tok/s after the first token, median of {args.trials} alternating trials in one "
            f"process; {platform.machine()} {platform.system()}, MLX {mx.__version__} on "
            f"{mx.default_device()}, {blas_library()}; load average "
            f"{' '.join(f'{x:.2f}' for x in load)} at the end",
            "",
            "| prompt_lookup_num_tokens | plain tok/s | lookup tok/s | tokens from lookups | speedup | "
            "same tokens |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "| positions in one pass | ms | vs one decoding step |",
            "|---|---|---|",
            *(f"| {n} | {ms:.0f} | {ms / costs[1]:.2f}x |" for n, ms in costs.items()),
        ],
    )


if __name__ == "__main__":
    main()
