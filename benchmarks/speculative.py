"""Speculative decoding against plain decoding, with a draft that agrees with the target.

Not part of the test suite. The target has random weights of a preset's shape (or the overhead-bound
`small` shape of compare.py) with its layers from --draft-layers on turned into identities, and the draft
is its first --draft-layers layers: every proposal is accepted unless the two differ in rounding, which
measures what speculative decoding gains when the draft is good. Trials alternate between plain and
speculative decoding (and, with --mlx-lm, mlx-lm's GPT-2 at the same widths with a draft built the same
way) in one process; the tokens of each speculative run are checked against its own plain run. Appends a
markdown table to --output.

    python benchmarks/speculative.py --preset small --draft-layers 2 --trials 5
    python benchmarks/speculative.py --preset 564M --draft-layers 2 --gen-tokens 32 --trials 3
    python benchmarks/speculative.py --preset small --trials 5 --mlx-lm    # mlx-lm's, same shapes and draft
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx
from compare import SHAPES, VOCAB_SIZE, append_table

from mlx_xglm import bench, generate_step, speculative_generate_step
from mlx_xglm.bench import blas_library, make_agreeing_draft, random_model


def mlx_lm_pair(shape: dict, draft_layers: int):
    """mlx-lm's GPT-2 at the same widths and its agreeing draft, built as make_agreeing_draft builds ours:
    the target's layers from `draft_layers` on made identities, the draft its first layers."""
    from mlx_lm.models import gpt2

    def make(layers):
        return gpt2.Model(
            gpt2.ModelArgs(
                model_type="gpt2",
                n_ctx=2048,
                n_embd=shape["d_model"],
                n_head=shape["attention_heads"],
                n_layer=layers,
                n_positions=2048,
                layer_norm_epsilon=1e-5,
                vocab_size=shape.get("vocab_size", VOCAB_SIZE),
            )
        )

    model, draft = make(shape["num_layers"]), make(draft_layers)
    for block in model.model.h[draft_layers:]:
        for module in (block.attn.c_proj, block.mlp.c_proj):
            module.update({name: mx.zeros_like(value) for name, value in module.parameters().items()})
    draft.model.wte, draft.model.wpe, draft.model.ln_f = model.model.wte, model.model.wpe, model.model.ln_f
    draft.model.h = model.model.h[:draft_layers]
    mx.eval(model.parameters())
    return model, draft


def timed(steps) -> tuple[float, list[int], list[bool]]:
    """Seconds for a whole generation (prefill included), its tokens and from_draft flags."""
    start = time.perf_counter()
    out = list(steps)
    return (
        time.perf_counter() - start,
        [o[0] for o in out],
        [bool(o[2]) if len(o) > 2 else False for o in out],
    )


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--preset", choices=list(SHAPES), default="small")
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--num-draft-tokens", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--mlx-lm", action="store_true", help="also time mlx-lm's, interleaved with ours")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/RESULTS.md"))
    args = parser.parse_args()

    bench.PRESETS.setdefault(args.preset, SHAPES[args.preset])
    shape = SHAPES[args.preset]
    model = random_model(args.preset)
    draft = make_agreeing_draft(model, args.draft_layers)
    prompt = mx.random.randint(4, model.config.vocab_size, (args.prompt_tokens,), key=mx.random.key(0))
    n, k = args.gen_tokens, args.num_draft_tokens
    runs = {
        "mlx-xglm plain": lambda: generate_step(prompt, model, max_tokens=n),
        "mlx-xglm speculative": lambda: speculative_generate_step(
            prompt, model, draft, num_draft_tokens=k, max_tokens=n
        ),
    }
    if args.mlx_lm:
        from mlx_lm.generate import generate_step as lm_generate_step
        from mlx_lm.generate import speculative_generate_step as lm_speculative_step

        lm_model, lm_draft = mlx_lm_pair(shape, args.draft_layers)
        runs["mlx-lm plain"] = lambda: lm_generate_step(prompt, lm_model, max_tokens=n)
        runs["mlx-lm speculative"] = lambda: lm_speculative_step(
            prompt, lm_model, lm_draft, num_draft_tokens=k, max_tokens=n
        )
    seconds = {name: [] for name in runs}
    tokens, accepted = {}, {}
    for trial in range(args.trials):
        for name, run in runs.items():
            elapsed, tokens[name], flags = timed(run())
            seconds[name].append(elapsed)
            accepted[name] = sum(flags) / max(len(flags), 1)
        print(f"trial {trial + 1}: " + ", ".join(f"{name} {s[-1]:.2f} s" for name, s in seconds.items()))
    rows = [
        f"Speculative decoding, {args.preset} shapes ({shape['num_layers']} layers, d_model "
        f"{shape['d_model']}), "
        f"float32; draft: the target's first {args.draft_layers} layers (the later ones made identities), "
        f"{k} draft tokens per step; {args.prompt_tokens}-token prompt, {n} tokens, median of {args.trials} "
        f"interleaved trials in one process; {platform.machine()} {platform.system()}, MLX {mx.__version__} "
        f"on {mx.default_device()}, {blas_library()}; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end",
        "",
        "| decoding | whole generation (s) | tokens from the draft | speedup (median trial) | same tokens |",
        "|---|---|---|---|---|",
    ]
    for name in runs:
        own = name.split()[0]
        # Each trial's own ratio: a speculative run and its plain run follow each other, so drifting load
        # hits both; the median of those ratios is the speedup.
        ratios = [p / s for p, s in zip(seconds[f"{own} plain"], seconds[name], strict=True)]
        median = statistics.median(seconds[name])
        same = "" if name.endswith("plain") else ("yes" if tokens[name] == tokens[f"{own} plain"] else "NO")
        drafted = "" if name.endswith("plain") else f"{accepted[name]:.0%}"
        rows.append(f"| {name} | {median:.2f} | {drafted} | {statistics.median(ratios):.2f}x | {same} |")
    append_table(args.output, rows)


if __name__ == "__main__":
    main()
