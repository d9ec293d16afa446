"""Entry point of the `mlx-xglm` command: parses arguments and hands off to a subcommand.

Each subcommand is a module in this package with `register(subparsers)`, which adds its parser and sets
`run=function(args) -> exit code` as the parser's default.
"""

from __future__ import annotations

import argparse
import os
import sys

from mlx_xglm import XGLMError, __version__

COMMANDS: list[str] = ["bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-xglm",
        description="Run Meta's XGLM multilingual language models with MLX.",
    )
    parser.add_argument("--version", action="version", version=f"mlx-xglm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = __import__(f"{__package__}.{name}", fromlist=["register"])
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except XGLMError as e:
        if os.environ.get("MLX_XGLM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
