"""Entry point of the `mlx-xglm` command: parses arguments and hands off to a subcommand."""

from __future__ import annotations

import argparse
import os
import sys

from mlx_xglm import XGLMError, __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-xglm",
        description="Run Meta's XGLM multilingual language models with MLX.",
    )
    parser.add_argument("--version", action="version", version=f"mlx-xglm {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
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
