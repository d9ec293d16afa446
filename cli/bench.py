"""`mlx-xglm bench`: prompt and generation speed, peak memory and the decoding bandwidth ceiling."""

from __future__ import annotations

import argparse
import json
import sys

import mlx.core as mx
from rich.console import Console
from rich.table import Table

from mlx_xglm import XGLMError, load
from mlx_xglm.bench import PRESETS, benchmark, blas_library, make_agreeing_draft, random_model
from mlx_xglm.checkpoints import DTYPES, quantize_model
from mlx_xglm.decoding.speculative import check_draft_model

EXAMPLES = """\
examples:
  mlx-xglm bench --preset 564M
  mlx-xglm bench --preset 7.5B --layers 4 --dtype float16 --q-bits 4
  mlx-xglm bench --model mlx_model --prompt-tokens 128 --gen-tokens 32 --json
  mlx-xglm bench --preset 564M --draft-preset 564M --draft-layers 4 --prompt-tokens 16
  mlx-xglm bench --model ./xglm-2.9B --draft-model ./xglm-564M --num-draft-tokens 4
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure prompt and generation speed",
        description="Measure prompt tokens/s, generation tokens/s, time to first token, peak memory and "
        "the memory-bandwidth ceiling for decoding, over several trials.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a local folder or Hub repo id to benchmark")
    source.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="random weights in the shape of a released checkpoint (default: 564M)",
    )
    parser.add_argument("--layers", type=int, help="keep only the first N layers of a preset")
    parser.add_argument("--dtype", choices=list(DTYPES), help="weight dtype (preset default: float32)")
    parser.add_argument("--q-bits", type=int, choices=[2, 3, 4, 5, 6, 8], help="quantize to this many bits")
    parser.add_argument("--q-group-size", type=int, default=64, choices=[32, 64, 128])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=3)
    draft = parser.add_argument_group("speculative decoding (timed alternately with plain decoding)")
    drafts = draft.add_mutually_exclusive_group()
    drafts.add_argument("--draft-model", metavar="PATH", help="a draft checkpoint folder or Hub repo id")
    drafts.add_argument(
        "--draft-preset",
        choices=list(PRESETS),
        help="a random draft of a preset's shape; the target's own preset gives a draft that agrees with "
        "it (its first --draft-layers layers, the target's later layers made identities)",
    )
    draft.add_argument("--draft-layers", type=int, default=2, help="layers of a --draft-preset (default 2)")
    draft.add_argument("--num-draft-tokens", type=int, default=3, help="draft tokens per step (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.set_defaults(run=run)


def _model(args):
    if args.model is None:
        preset = args.preset or "564M"
        model = random_model(preset, args.layers, args.dtype or "float32", args.q_bits, args.q_group_size)
        return model, {"preset": preset, "layers": model.config.num_layers}
    if args.layers is not None:
        raise XGLMError("--layers applies to --preset only, not to --model")
    model, _ = load(args.model)
    if args.dtype:
        model.set_dtype(DTYPES[args.dtype])
    if args.q_bits is not None:
        quantize_model(model, args.q_bits, args.q_group_size)
    mx.eval(model.parameters())
    return model, {"model": args.model, "layers": model.config.num_layers}


def _draft(args, model, config):
    """The draft model of --draft-model or --draft-preset, or None; records it in `config`."""
    if args.num_draft_tokens < 1:
        raise XGLMError(f"--num-draft-tokens must be at least 1, got {args.num_draft_tokens}")
    if args.draft_layers < 1:
        raise XGLMError(f"--draft-layers must be at least 1, got {args.draft_layers}")
    if args.draft_model is not None:
        draft, _ = load(args.draft_model)
        config["draft_model"] = args.draft_model
    elif args.draft_preset is None:
        return None
    elif args.draft_preset == config.get("preset") and args.q_bits is None:
        draft = make_agreeing_draft(model, args.draft_layers)
        config["draft_preset"] = f"{args.draft_preset}, agreeing: the first {args.draft_layers} layers"
    else:
        dtype = args.dtype or "float32"
        draft = random_model(args.draft_preset, args.draft_layers, dtype, args.q_bits, args.q_group_size)
        config["draft_preset"] = f"{args.draft_preset}, random: {args.draft_layers} layers"
    check_draft_model(model, draft)
    config["num_draft_tokens"] = args.num_draft_tokens
    return draft


def run(args) -> int:
    err = Console(stderr=True)
    with err.status("building the model"):
        model, config = _model(args)
        draft = _draft(args, model, config)
    config.update(
        dtype=args.dtype or "float32",
        q_bits=args.q_bits,
        q_group_size=args.q_group_size if args.q_bits else None,
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        device=str(mx.default_device()),
        blas=blas_library(),
    )

    def progress(i, trial, plain=None):
        line = (
            f"trial {i + 1}/{args.trials}: prompt {trial.prompt_tps:.1f} tok/s, "
            f"generation {trial.generation_tps:.2f} tok/s"
        )
        if plain is not None:
            line += f", acceptance {trial.acceptance:.0%}; plain decoding {plain.generation_tps:.2f} tok/s"
        err.print(line)

    result = benchmark(
        model,
        config,
        args.prompt_tokens,
        args.gen_tokens,
        args.trials,
        progress,
        draft_model=draft,
        num_draft_tokens=args.num_draft_tokens,
    )
    summary = result.summary()
    if args.json:
        print(json.dumps(summary))
        return 0
    table = Table(title=f"mlx-xglm bench: {config.get('preset') or config.get('model')}")
    table.add_column("metric")
    table.add_column("min", justify="right")
    table.add_column("median", justify="right")
    for label, name, fmt in [
        ("prompt tokens/s", "prompt_tps", "{:.1f}"),
        ("generation tokens/s", "generation_tps", "{:.2f}"),
        ("time to first token (s)", "ttft", "{:.3f}"),
        ("peak memory (GB)", "peak_memory", "{:.3f}"),
    ]:
        table.add_row(label, fmt.format(result.stat(name, "min")), fmt.format(result.stat(name, "median")))
    table.add_row("decode ceiling tokens/s", "", f"{summary['ceiling_tps']:.2f}")
    table.add_row("fraction of ceiling", "", f"{summary['ceiling_fraction']:.0%}")
    table.add_row("host graph time per token (ms)", "", f"{summary['graph_ms_per_token']:.3f}")
    if draft is not None:
        plain = result.plain_trials
        table.add_row(
            "plain generation tokens/s",
            f"{result.stat('generation_tps', 'min', plain):.2f}",
            f"{summary['plain_generation_tps']:.2f}",
        )
        table.add_row("draft acceptance rate", "", f"{summary['acceptance']:.0%}")
        table.add_row("speculative speedup", "", f"{summary['speculative_speedup']:.2f}x")
    Console(file=sys.stdout).print(table)
    print(
        f"weights {summary['weight_gb']:.3f} GB read per token, copy bandwidth "
        f"{summary['bandwidth_gbs']:.1f} GB/s, {config['device']}, BLAS: {config['blas']}"
    )
    return 0
