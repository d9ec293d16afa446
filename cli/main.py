"""Entry point of the `mlx-xglm` command: parses arguments and hands off to a subcommand.

Each subcommand is a module in this package with `register(subparsers)`, which adds its parser and sets
`run=function(args) -> exit code` as the parser's default.

Exit status: 0 done, 1 an error the user can fix (one line `error: ...` on stderr; the traceback only with
MLX_XGLM_DEBUG=1), 2 bad command-line flags (argparse's usage message), 130 interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from mlx_xglm import XGLMError, __version__

COMMANDS: list[str] = [
    "generate",
    "chat",
    "convert",
    "bench",
    "lora",
    "fuse",
]

EXAMPLES = """\
examples:
  mlx-xglm generate --prompt "The capital of France is"
  mlx-xglm chat --model ./xglm-564M
  mlx-xglm convert --hf-path facebook/xglm-564M -q --mlx-path xglm-564M-4bit
  mlx-xglm bench --preset 564M
  mlx-xglm lora --model ./xglm-564M --train --data ./data
  mlx-xglm COMMAND --help

Set MLX_XGLM_DEBUG=1 to see the full traceback of an error.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-xglm",
        description="Run Meta's XGLM multilingual language models with MLX.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mlx-xglm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = __import__(f"{__package__}.{name}", fromlist=["register"])
        module.register(subparsers)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    # Library warnings (an untied head, say) read like the errors: one line, no source location.
    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Report a stray flag with the usage of the subcommand it was given to, not the top-level one.
        getattr(args, "usage_error", parser.error)(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 0
    debug = bool(os.environ.get("MLX_XGLM_DEBUG"))
    try:
        return args.run(args)
    except XGLMError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C before any text was made (while loading, say): end the line the ^C was echoed on.
        if debug:
            raise
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
