"""`mlx-xglm chat`: an interactive conversation with a base model, one cached transcript."""

from __future__ import annotations

import argparse
import sys
from contextlib import closing
from itertools import chain

from mlx_xglm import XGLMError
from mlx_xglm.decoding.chat import Conversation
from mlx_xglm.tokenization.prompt import DEFAULT_TEMPLATE, split_template

from .launch import add_pipeline_arg, finish_ranks, launched_seed, refuse_launched, start_ranks
from .options import (
    add_adapter_arg,
    add_draft_args,
    add_kv_cache_args,
    add_model_args,
    add_prompt_cache_args,
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
from .render import Renderer, turn_stats

EXAMPLES = r"""
examples:
  mlx-xglm chat
  mlx-xglm chat --model ./xglm-1.7B --temp 0.7 --top-p 0.9 --repetition-penalty 1.2
  mlx-xglm chat --template "Q: {message}\nA:"

XGLM is a base model: it continues a transcript, one line per turn, written the way it saw text in training
(each newline as </s>). Its reply ends at the end of its line or at the next user marker. The cache keeps
the conversation, so each turn reads only its own new text.
"""

COMMANDS_HELP = """\
/reset      forget the conversation and start a new one
/help       show this help
/quit, q    leave (also Ctrl-D); Ctrl-C stops a reply, and leaves when pressed at the prompt"""

QUIT = {"q", "/q", "/quit", "/exit"}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="talk with a model in the terminal",
        description="Talk with an XGLM model: a transcript of turns, kept in the KV cache between turns.",
        epilog=EXAMPLES,
        formatter_class=help_formatter,
    )
    add_model_args(parser)
    add_adapter_arg(parser)
    parser.add_argument(
        "--template",
        default=DEFAULT_TEMPLATE.replace("\n", "\\n"),
        metavar="TEXT",
        help=r'one turn, with {message} for your text and "\n" between lines '
        r'(default: "User: {message}\nAssistant:")',
    )
    add_sampling_args(parser, max_tokens=256)
    add_draft_args(parser)
    add_prompt_cache_args(parser)
    add_kv_cache_args(parser)
    add_pipeline_arg(parser)
    parser.set_defaults(run=run, usage_error=parser.error)


def run(args: argparse.Namespace) -> int:
    group = start_ranks()
    refuse_launched(group, "--draft-model", args.draft_model)
    renderer = Renderer(quiet=group.rank() != 0)
    sampling = sampling_from(args)
    sampling.update(kv_cache_from(args))
    template = unescape(check_utf8(args.template, "--template"))
    split_template(template)
    model, tokenizer, _ = load_model(
        args.model, args.revision, renderer.spinner, args.adapter_path, group, args.pipeline
    )
    draft = load_draft(args, model, tokenizer, renderer.spinner)
    sampling.update(draft)
    conversation = Conversation(
        model,
        tokenizer,
        template,
        max_kv_size=args.max_kv_size,
        draft_model=draft.get("draft_model"),
        prompt_cache_size=args.prompt_cache_size,
        prompt_cache_bytes=args.prompt_cache_bytes,
    )
    launched_seed(args, group)
    seed_from(args)
    if sys.stdin.isatty():
        # Importing readline gives input() line editing and history.
        import readline  # noqa: F401
    renderer.note(f"{args.model}: /help for commands, /reset to start over, /quit or Ctrl-D to leave.")
    while True:
        try:
            line = input(conversation.user_prompt)
            line.encode("utf-8")  # undecodable bytes arrive as surrogates in the C locale
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 130
        except UnicodeError:
            raise XGLMError("the chat input is not UTF-8 text; type or pipe UTF-8") from None
        command = line.strip()
        if not command:
            continue
        if command in QUIT:
            return 0
        if command == "/reset":
            conversation.reset()
            renderer.note("(conversation reset)")
        elif command == "/help":
            renderer.note(COMMANDS_HELP)
        elif command.startswith("/"):
            renderer.note(f"unknown command {command}; /help lists the commands")
        else:
            answer(conversation, command, renderer, args.max_tokens, sampling)
            finish_ranks(group)


def answer(conversation: Conversation, message: str, renderer: Renderer, max_tokens: int, sampling) -> None:
    """Stream one reply and its stats line; Ctrl-C ends the reply early and keeps it in the transcript."""
    last = None
    with closing(conversation.reply(message, max_tokens, **sampling)) as responses:
        try:
            with renderer.spinner("Reading your message"):
                first = next(responses, None)
            renderer.write(f"{conversation.assistant_label} ")
            for response in chain([first] if first else [], responses):
                renderer.write(response.text)
                last = response
        except KeyboardInterrupt:
            renderer.write(" ^C")
    renderer.end_line()
    if last is not None:
        renderer.note(turn_stats(last))
