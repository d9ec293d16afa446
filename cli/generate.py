"""`mlx-xglm generate`: continue a prompt, streaming the text as it is made."""

from __future__ import annotations

import argparse
import json
import os
import sys
from itertools import chain
from pathlib import Path

from mlx_xglm import (
    XGLMError,
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    model_fingerprint,
    save_prompt_cache,
    stream_generate,
    trim_prompt_cache,
)
from mlx_xglm.decoding import cached_tokens, prompt_cache_max_kv_size
from mlx_xglm.tokenization import NEWLINES, prompt_ids

from .launch import LAUNCH_NOTE, add_pipeline_arg, finish_ranks, launched_seed, refuse_launched, start_ranks
from .options import (
    add_adapter_arg,
    add_draft_args,
    add_kv_cache_args,
    add_model_args,
    add_sampling_args,
    check_utf8,
    help_formatter,
    kv_cache_from,
    load_draft,
    load_model,
    sampling_from,
    seed_from,
    unescape,
)
from .render import Renderer, footer_lines

EXAMPLES = (
    """\
examples:
  mlx-xglm generate --prompt "The capital of France is"
  mlx-xglm generate --model ./xglm-564M --prompt "Il était une fois" --max-tokens 50 --temp 0.7 --seed 1
  echo "Der Hund" | mlx-xglm generate --prompt - --quiet > continuation.txt
  mlx-xglm generate --prompt-file story.txt --newlines eos --stop "THE END" --json
  mlx-xglm generate --prompt-cache-file doc.safetensors --prompt-file doc.txt   # 1st run: caches doc.txt
  mlx-xglm generate --prompt-cache-file doc.safetensors --prompt "Summary:"     # later: reads only this

Text goes to stdout as it is generated, then a footer with prompt and generation speed and peak memory.
When stdout is not a terminal it gets the plain text only, and the footer goes to stderr.
Ctrl-C stops at once, keeps the text so far, prints the stats and exits with status 130.
"""
    + LAUNCH_NOTE % (("generate",) * 3)
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="continue a prompt, streaming the generated text",
        description="Continue a prompt with an XGLM model, streaming the text as it is generated.",
        epilog=EXAMPLES,
        formatter_class=help_formatter,
    )
    add_model_args(parser)
    add_adapter_arg(parser)
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument(
        "--prompt", "-p", metavar="TEXT", help=r'text to continue ("\n" reads as a newline); "-" reads stdin'
    )
    prompt.add_argument(
        "--prompt-file", metavar="PATH", help='read the prompt from a UTF-8 file ("-": stdin)'
    )
    add_sampling_args(parser, max_tokens=100)
    add_draft_args(parser)
    add_kv_cache_args(parser)
    add_pipeline_arg(parser)
    parser.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)"
    )
    parser.add_argument(
        "--newlines",
        choices=NEWLINES,
        default="space",
        help="space: a newline is a space (transformers); eos: a newline is </s>, as in XGLM's training "
        "text, and a generated </s> prints as a newline (default: space)",
    )
    parser.add_argument(
        "--prompt-cache-file",
        metavar="FILE",
        help="KV cache of an earlier prompt: when FILE exists, generation continues after the text cached "
        "in it and the prompt is only the new text; when it does not, the prompt's cache is saved to FILE",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "--verbose", "-v", action="store_true", help="also report the model, load time and finish reason"
    )
    verbosity.add_argument("--quiet", "-q", action="store_true", help="print the generated text only")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object: text, tokens, finish_reason, stats"
    )
    parser.set_defaults(run=run, usage_error=parser.error)


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt text from --prompt, --prompt-file or stdin; one trailing newline of a file is dropped."""
    if args.prompt is not None and args.prompt != "-":
        return unescape(check_utf8(args.prompt, "--prompt"))
    source = args.prompt_file
    if source is None and args.prompt is None:
        if sys.stdin.isatty():
            args.usage_error(
                "give the text to continue with --prompt TEXT, --prompt -, or --prompt-file PATH"
            )
        source = "-"
    if args.prompt == "-" or source == "-":
        try:
            text = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise XGLMError(f"the prompt on stdin is not UTF-8 text ({e.reason} at byte {e.start})") from None
    else:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise XGLMError(
                f"prompt file {source} is not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None
        except OSError as e:
            raise XGLMError(f"cannot read prompt file {source}: {e.strerror}") from None
    return text.removesuffix("\n").removesuffix("\r")


def run(args: argparse.Namespace) -> int:
    prompt = read_prompt(args)
    stop = [unescape(check_utf8(s, "--stop")) for s in args.stop]
    cache_file = Path(args.prompt_cache_file) if args.prompt_cache_file else None
    if cache_file is not None:
        check_cache_path(cache_file)
    group = start_ranks()
    refuse_launched(group, "--prompt-cache-file", cache_file)
    refuse_launched(group, "--draft-model", args.draft_model)
    renderer = Renderer(quiet=args.quiet or args.json or group.rank() != 0)
    sampling = sampling_from(args)
    sampling.update(kv_cache_from(args))
    model, tokenizer, load_seconds = load_model(
        args.model, args.revision, renderer.spinner, args.adapter_path, group, args.pipeline
    )
    if args.draft_model is not None and cache_file is not None:
        raise XGLMError("--draft-model cannot be combined with --prompt-cache-file")
    draft = load_draft(args, model, tokenizer, renderer.spinner)
    fingerprint = model_fingerprint(model, tokenizer) if cache_file is not None else None

    if cache_file is not None and cache_file.exists():
        cache = load_prompt_cache(cache_file, fingerprint=fingerprint)
        kept = prompt_cache_max_kv_size(cache)
        if args.max_kv_size is not None and args.max_kv_size != kept:
            raise XGLMError(
                f"{cache_file} holds a cache with max_kv_size {kept}; --max-kv-size {args.max_kv_size} "
                "cannot change it: drop the flag or use another --prompt-cache-file"
            )
    else:
        cache = make_prompt_cache(model, max_kv_size=args.max_kv_size)
    if "draft_model" in draft:
        cache += make_prompt_cache(draft["draft_model"])
    cached = cached_tokens(cache)
    ids = prompt_ids(tokenizer, prompt, cached, args.newlines)
    launched_seed(args, group)
    seed_from(args)
    responses = stream_generate(
        model,
        tokenizer,
        ids,
        args.max_tokens,
        prompt_cache=cache,
        stop=stop or None,
        newlines=args.newlines,
        **sampling,
        **draft,
    )

    text, tokens, last, status = [], [], None, 0
    try:
        with renderer.spinner(f"Reading the prompt ({len(ids)} tokens)"):
            first = next(responses, None)
        for last in chain([first] if first else [], responses):
            text.append(last.text)
            tokens.append(last.token)
            if not args.json:
                renderer.write(last.text)
    except KeyboardInterrupt:
        status = 130
    finish_ranks(group)
    finish = "interrupted" if status else getattr(last, "finish_reason", None)

    if cache_file is not None and cached == 0 and not status:
        metadata = {"model": args.model, "newlines": args.newlines}
        save_prompt_only(cache_file, cache, len(ids), metadata, fingerprint)
    if args.json:
        print(json.dumps(result_object("".join(text), tokens, finish, last), ensure_ascii=False))
    elif last is None:
        renderer.footer(
            [f"Prompt: {len(ids)} tokens, {'interrupted while reading it' if status else 'read'}"]
        )
    else:
        lines = footer_lines(last)
        if args.verbose:
            lines += [
                f"Model: {args.model}, loaded in {load_seconds:.2f} s",
                f"Cached prompt tokens: {cached}",
                f"Finish reason: {finish}",
            ]
        renderer.footer(lines)
    return status


def check_cache_path(path: Path) -> None:
    """Refuse a --prompt-cache-file that could be neither read nor written, before anything is generated."""
    if path.suffix != ".safetensors":
        raise XGLMError(f"--prompt-cache-file {path} must end in .safetensors")
    if path.exists():
        if not path.is_file() or not os.access(path, os.R_OK):
            raise XGLMError(f"--prompt-cache-file {path} is not a readable file")
        return
    folder = path.parent
    if not folder.is_dir():
        raise XGLMError(f"--prompt-cache-file {path}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise XGLMError(f"--prompt-cache-file {path}: folder {folder} is not writable")


def save_prompt_only(
    path: Path, cache: list, n_prompt: int, metadata: dict[str, str], fingerprint: str | None
) -> None:
    """Trim the generated tokens off `cache` and save the prompt's part to `path`."""
    extra = cached_tokens(cache) - n_prompt
    if extra and not can_trim_prompt_cache(cache):
        raise XGLMError(
            f"cannot save {path}: the prompt no longer fits in --max-kv-size "
            f"{prompt_cache_max_kv_size(cache)}; raise --max-kv-size or drop it"
        )
    trim_prompt_cache(cache, extra)
    save_prompt_cache(path, cache, metadata, fingerprint=fingerprint)


def result_object(text: str, tokens: list[int], finish: str | None, last) -> dict:
    """What --json prints: the text, the generated ids, why it ended, and the footer's figures."""
    names = ["prompt_tokens", "prompt_tps", "generation_tokens", "generation_tps", "peak_memory"]
    stats = {name: getattr(last, name) for name in names} if last is not None else {}
    return {"text": text, "tokens": tokens, "finish_reason": finish, "stats": stats}
