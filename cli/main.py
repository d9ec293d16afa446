"""Entry point of the `mlx-xglm` command: parses arguments and hands off to a subcommand.

Each subcommand is a module in this package with `register(subparsers)`, which adds its parser and sets
`run=function(args) -> exit code` as the parser's default.

Exit status: 0 done (also when the reader of stdout went away, as in `| head`), 1 an error (one line
`error: ...` on stderr; the traceback only with MLX_XGLM_DEBUG=1), 2 bad command-line flags (argparse's
usage message), 130 interrupted with Ctrl-C, 143 or 129 by SIGTERM or SIGHUP while writing an output.
The script leaves through `entry`, which flushes and ends the process with `os._exit`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import traceback
import warnings

from mlx_xglm import XGLMError, __version__
from mlx_xglm.world import RankFailed, is_quiet_rank

COMMANDS: list[str] = [
    "generate",
    "chat",
    "convert",
    "bench",
    "tiny",
    "server",
    "eval",
    "perplexity",
    "lora",
    "fuse",
]

EXAMPLES = """\
examples:
  mlx-xglm generate --prompt "The capital of France is"
  mlx-xglm chat --model ./xglm-564M
  mlx-xglm convert --hf-path facebook/xglm-564M -q --mlx-path xglm-564M-4bit
  mlx-xglm bench --preset 564M
  mlx-xglm tiny --mlx-path tiny-xglm    # a small random-weight checkpoint for trying things offline
  mlx-xglm server --model ./xglm-564M --port 8080
  mlx-xglm eval --model facebook/xglm-564M --tasks xcopa,xstorycloze
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
    for command in subparsers.choices.values():
        command.set_defaults(flags=_flags(command))
    return parser


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Parameter name -> the flag that sets it (`max_kv_size` -> `--max-kv-size`), plus the library names
    a command registers with `set_defaults(param_flags={...})` where they differ from the flag's dest;
    argparse keeps its arguments only in `_actions`."""
    flags = {
        action.dest: next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
        for action in parser._actions
        if action.option_strings
    }
    return {**flags, **(parser.get_default("param_flags") or {})}


def error_line(error: XGLMError, flags: dict[str, str]) -> str:
    """`error: ...` for an XGLMError, the library's name of the parameter at fault (`temp`) replaced by
    the command's flag for it (`--temp`), wherever the message names it."""
    message = str(error)
    flag = flags.get(error.param)
    if flag is not None:
        # Not inside `code spans`: they quote commands and files, which must stay as written.
        parts = message.split("`")
        name = re.compile(rf"(?<![\w./-]){re.escape(error.param)}(?![\w./-])")
        message = "`".join(p if i % 2 else name.sub(flag, p) for i, p in enumerate(parts))
    return f"error: {message}"


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit status; errors become one line on stderr (see the module doc)."""
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
    if os.environ.get("MLX_XGLM_DEBUG"):
        return args.run(args)
    try:
        return args.run(args)
    except XGLMError as e:
        if not (isinstance(e, RankFailed) and is_quiet_rank()):
            print(error_line(e, getattr(args, "flags", {})), file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        # Ctrl-C (or SIGTERM/SIGHUP while an output was written) before any text was made: end the line
        # the ^C was echoed on. The status is 128 + the signal's number, as the shell's.
        print(file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except BrokenPipeError:
        # The reader went away (`| head`): a normal end. Stop quietly, and keep the flush at exit quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory; try a smaller model, --max-kv-size or fewer tokens", file=sys.stderr)
        return 1
    except Exception as e:
        _internal_error(e)
        return 1


def _internal_error(e: BaseException) -> None:
    """One line for a failure that is not the user's (a bug): what it was, and how to see where."""
    print(
        f"error: internal error ({type(e).__name__}: {e}); MLX_XGLM_DEBUG=1 shows the traceback",
        file=sys.stderr,
    )


def _flushed(code: int) -> int:
    """Flush stdout and stderr; a reader gone away is a normal end, a failed write an error."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            pass
        except (OSError, ValueError) as e:
            code = code or 1
            with contextlib.suppress(OSError, ValueError):
                os.write(2, f"error: cannot write the output: {getattr(e, 'strerror', e)}\n".encode())
    return code


def entry() -> None:
    """The `mlx-xglm` script: run `main`, flush the output, and leave with `os._exit`.

    A normal interpreter exit waits for the thread pool of a preloaded OpenBLAS (the recipe for float32
    speed on Linux in docs/performance.md), which can hang forever; by then every output is written.
    """
    try:
        code = main()
    except SystemExit as e:  # argparse: --help, --version, usage errors
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt as e:
        if os.environ.get("MLX_XGLM_DEBUG"):
            traceback.print_exc()
        code = 128 + getattr(e, "signum", signal.SIGINT)
    except BaseException as e:  # with MLX_XGLM_DEBUG=1, or a failure before a command runs
        if os.environ.get("MLX_XGLM_DEBUG"):
            traceback.print_exc()
        else:
            _internal_error(e)
        code = 1
    os._exit(_flushed(code))
