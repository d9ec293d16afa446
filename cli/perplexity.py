"""`mlx-xglm perplexity`: perplexity of text files, one row per file and the total."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mlx_xglm import XGLMError
from mlx_xglm.evaluation import perplexity
from mlx_xglm.evaluation.perplexity import exp_nll

from .options import add_adapter_arg, add_model_args, help_formatter, load_model
from .scoring_options import LAUNCH_NOTE, quiet_renderer, start_group

EXAMPLES = (
    """\
examples:
  mlx-xglm perplexity --model facebook/xglm-564M --data en.txt fr.txt sw.txt
  mlx-xglm perplexity --model ./xglm-564M --data wiki.txt --context-length 1024 --stride 512 --json

Each file is one text, read in windows of --context-length tokens starting every --stride tokens
(Hugging Face's strided method); each token is scored once, with the longest context its window gives.
"""
    + LAUNCH_NOTE % ("perplexity", "perplexity")
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "perplexity",
        help="perplexity of text files (one per language, say)",
        description="Perplexity of each text file and of all of them together, by the strided method.",
        epilog=EXAMPLES,
        formatter_class=help_formatter,
    )
    add_model_args(parser)
    add_adapter_arg(parser)
    parser.add_argument("--data", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    parser.add_argument(
        "--context-length", type=int, metavar="N", help="window length (default: the model's positions)"
    )
    parser.add_argument("--stride", type=int, metavar="N", help="window start every N tokens (default: half)")
    parser.add_argument(
        "--batch-size", type=int, default=8, metavar="N", help="windows per forward (default: 8)"
    )
    parser.add_argument(
        "--newlines",
        choices=["space", "eos"],
        default="space",
        help="space: a newline is a space (default); eos: a newline is </s>, as in XGLM's training text",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: perplexity, nll, tokens and per-file entries",
    )
    parser.set_defaults(run=run, usage_error=parser.error)


def _read(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise XGLMError(f"data file {path} does not exist") from None
    except UnicodeDecodeError:
        raise XGLMError(f"data file {path} is not UTF-8 text") from None
    except OSError as e:
        raise XGLMError(f"cannot read data file {path}: {e.strerror}") from None
    if not text.strip():
        raise XGLMError(f"data file {path} is empty; give it some text to score")
    return text


def _finite(row: dict) -> dict:
    # JSON has no infinity: a perplexity too large for a float is written as null.
    return {**row, "perplexity": row["perplexity"] if math.isfinite(row["perplexity"]) else None}


def run(args: argparse.Namespace) -> int:
    group = start_group()
    texts = {path: _read(path) for path in args.data}
    model, tokenizer, _ = load_model(
        args.model, args.revision, quiet_renderer(group).spinner, args.adapter_path
    )
    rows = []
    for path, text in texts.items():
        result = perplexity(
            model,
            tokenizer,
            text,
            context_length=args.context_length,
            stride=args.stride,
            batch_size=args.batch_size,
            newlines=args.newlines,
            verbose=not args.json,
            group=group,
        )
        rows.append(
            {"file": path, "perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens}
        )
    nll, tokens = math.fsum(r["nll"] for r in rows), sum(r["tokens"] for r in rows)
    total = {"perplexity": exp_nll(nll, tokens), "nll": nll, "tokens": tokens}
    if group.rank() != 0:
        return 0
    if args.json:
        # JSON has no infinity: a perplexity too large for a float is written as null.
        finite = [
            {**r, "perplexity": r["perplexity"] if math.isfinite(r["perplexity"]) else None} for r in rows
        ]
        total_out = {
            **total,
            "perplexity": total["perplexity"] if math.isfinite(total["perplexity"]) else None,
        }
        print(json.dumps({**total_out, "files": finite}))
        return 0
    table = Table(title=f"perplexity: {args.model}")
    for name in ("file", "tokens", "nll", "perplexity"):
        table.add_column(name, justify="left" if name == "file" else "right", overflow="fold")
    for r in [*rows, {"file": "total", **total}]:
        ppl = r["perplexity"]
        table.add_row(
            r["file"], str(r["tokens"]), f"{r['nll']:.2f}", f"{ppl:.3f}" if ppl < 1e6 else f"{ppl:.3e}"
        )
    Console().print(table)
    return 0
