"""`mlx-xglm tiny`: write a tiny random-weight checkpoint, for trying the commands offline."""

from __future__ import annotations

import argparse
import sys

from mlx_xglm.checkpoints.tiny import write_tiny_checkpoint

from .options import check_seed

EXAMPLES = """\
examples:
  mlx-xglm tiny
  mlx-xglm tiny --mlx-path ./tiny-xglm && mlx-xglm generate --model ./tiny-xglm --prompt "The dog"

The folder has the layout of a facebook/xglm-* repository (config.json, model.safetensors, the tokenizer
files): 2 layers, d_model 64, 4 heads, a 1008-token vocabulary trained on a short text in more than ten
scripts, random weights (the text it generates is gibberish). It is the checkpoint the tests use.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tiny",
        help="write a tiny random-weight checkpoint for trying mlx-xglm offline",
        description="Write a tiny XGLM checkpoint with random weights and a trained tokenizer, in the Hub "
        "layout, without downloading anything.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--mlx-path", default="tiny-xglm", help="output folder; must not exist yet (default: tiny-xglm)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_seed(args.seed)
    path = write_tiny_checkpoint(args.mlx_path, seed=args.seed)
    print(f'Wrote {path}: try mlx-xglm generate --model {path} --prompt "The dog"', file=sys.stderr)
    return 0
