"""Speculative decoding against plain decoding, with a draft that agrees with the target.

Not part of the test suite. The target has random weights of a preset's shape (or the overhead-bound
`small` shape of compare.py) with its layers from --draft-layers on turned into identities, and the draft
is its first --draft-layers layers: every proposal is accepted unless the two differ in rounding, which
measures what speculative decoding gains when the draft is good. Trials alternate between plain and
speculative decoding in one process; the tokens of both are checked to be the same. Appends a markdown
table to --output.

    python benchmarks/speculative.py --preset small --draft-layers 2 --trials 5
    python benchmarks/speculative.py --preset 564M --draft-layers 2 --gen-tokens 32 --trials 3
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import mlx.core as mx
from compare import SHAPES, append_table

from mlx_xglm import bench, generate_step, speculative_generate_step
from mlx_xglm.bench import benchmark, make_agreeing_draft, random_model


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--preset", choices=list(SHAPES), default="small")
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--num-draft-tokens", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/RESULTS.md"))
    args = parser.parse_args()

    bench.PRESETS.setdefault(args.preset, SHAPES[args.preset])
    model = random_model(args.preset)
    draft = make_agreeing_draft(model, args.draft_layers)
    prompt = mx.random.randint(4, model.config.vocab_size, (args.prompt_tokens,))
    plain = [t for t, _ in generate_step(prompt, model, max_tokens=args.gen_tokens)]
    drafted = speculative_generate_step(
        prompt, model, draft, num_draft_tokens=args.num_draft_tokens, max_tokens=args.gen_tokens
    )
    same = plain == [t for t, _, _ in drafted]

    def progress(i, trial, plain_trial):
        print(
            f"trial {i + 1}: speculative {trial.seconds:.2f} s (acceptance {trial.acceptance:.0%}), "
            f"plain {plain_trial.seconds:.2f} s"
        )

    result = benchmark(
        model,
        {},
        args.prompt_tokens,
        args.gen_tokens,
        args.trials,
        progress,
        draft_model=draft,
        num_draft_tokens=args.num_draft_tokens,
    )
    summary = result.summary()
    shape = SHAPES[args.preset]
    rows = [
        f"Speculative decoding, {args.preset} shapes ({shape['num_layers']} layers, "
        f"d_model {shape['d_model']}), float32; draft: the target's first {args.draft_layers} layers (the "
        f"later ones made identities), {args.num_draft_tokens} draft tokens per step; "
        f"{args.prompt_tokens}-token prompt, {args.gen_tokens} tokens, median of {args.trials} alternating "
        f"trials in one process; {platform.machine()} {platform.system()}, MLX {mx.__version__} on "
        f"{mx.default_device()}",
        "",
        "| decoding | whole generation (s) | decode tok/s | acceptance | speedup | same tokens |",
        "|---|---|---|---|---|---|",
        f"| plain | {result.stat('seconds', 'median', result.plain_trials):.2f} | "
        f"{summary['plain_generation_tps']:.1f} | | 1.00x | |",
        f"| speculative | {result.stat('seconds', 'median'):.2f} | {summary['generation_tps']:.1f} | "
        f"{summary['acceptance']:.0%} | {summary['speculative_speedup']:.2f}x | {'yes' if same else 'NO'} |",
    ]
    append_table(args.output, rows)


if __name__ == "__main__":
    main()
