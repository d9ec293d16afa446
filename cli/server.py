"""`mlx-xglm server`: an OpenAI-compatible HTTP server (the `[server]` extra: FastAPI and uvicorn)."""

from __future__ import annotations

import argparse
import os

from mlx_xglm import XGLMError
from mlx_xglm.tokenization.prompt import DEFAULT_TEMPLATE, split_template

from .launch import refuse_launched, start_ranks, stop_with_launcher
from .options import (
    add_adapter_arg,
    add_draft_args,
    add_kv_cache_args,
    add_model_args,
    add_prompt_cache_args,
    help_formatter,
    kv_cache_from,
    load_draft,
    load_model,
    unescape,
)
from .render import Renderer

EXAMPLES = r"""
examples:
  mlx-xglm server --model ./xglm-564M
  mlx-xglm server --model facebook/xglm-1.7B --port 9000 --max-batch 32
  MLX_XGLM_API_KEY=secret mlx-xglm server --host 0.0.0.0

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /tokenize,
POST /detokenize, GET /tokenizer_info, GET /health, GET /metrics (Prometheus). Ctrl-C or SIGTERM stops
it: running requests end with finish_reason "abort" and the server exits within seconds.
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port from 1 to 65535, got {value}")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "server",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve an XGLM model over OpenAI's completions and chat APIs, batching requests.",
        epilog=EXAMPLES,
        formatter_class=help_formatter,
    )
    add_model_args(parser)
    add_adapter_arg(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8080, help="port to listen on (default: 8080)")
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("MLX_XGLM_API_KEY"),
        help="require Authorization: Bearer KEY on every request (default: $MLX_XGLM_API_KEY, else none)",
    )
    parser.add_argument(
        "--model-id", metavar="NAME", help="the model name /v1/models reports (default: --model as given)"
    )
    parser.add_argument(
        "--max-batch", type=_positive, default=16, metavar="N", help="rows decoded together (default: 16)"
    )
    parser.add_argument(
        "--max-queue",
        type=_non_negative,
        default=64,
        metavar="N",
        help="rows that may wait for a place in the batch; more get a 503 (default: 64)",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=_positive,
        metavar="N",
        help="longer prompts get a 413 (default: the model's max_position_embeddings)",
    )
    parser.add_argument(
        "--max-model-len",
        type=_positive,
        metavar="N",
        help="prompt plus max_tokens may not exceed N; more gets a 400 (default: the model's "
        "max_position_embeddings, or --max-prompt-tokens if larger)",
    )
    parser.add_argument(
        "--allowed-origins",
        nargs="+",
        metavar="ORIGIN",
        help='web origins whose pages may call the API (CORS), e.g. http://localhost:3000, or "*" '
        "for any (default: none)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=_positive,
        default=8 * 1024 * 1024,
        metavar="N",
        help="larger request bodies get a 413 (default: 8 MiB)",
    )
    parser.add_argument(
        "--max-kv-size",
        type=_positive,
        metavar="N",
        help="keep only the last N positions of each row's KV cache",
    )
    add_prompt_cache_args(parser)
    add_kv_cache_args(parser)
    add_draft_args(parser)
    parser.add_argument(
        "--chat-template",
        default=DEFAULT_TEMPLATE.replace("\n", "\\n"),
        metavar="TEXT",
        help=r'one user turn of the transcript, as chat --template (default: "User: {message}\nAssistant:")',
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="log level; info logs one line per request (default: info)",
    )
    parser.set_defaults(run=run, usage_error=parser.error, param_flags={"template": "--chat-template"})


def run(args: argparse.Namespace) -> int:
    try:
        from mlx_xglm.serving import follow, serve
    except ImportError as e:
        raise XGLMError(
            f"mlx-xglm server needs the [server] extra ({e.name} is missing): pip install 'mlx-xglm[server]'"
        ) from None
    template = unescape(args.chat_template)
    engine_args = {
        "max_batch": args.max_batch,
        "max_queue": args.max_queue,
        "max_kv_size": args.max_kv_size,
        "prompt_cache_size": args.prompt_cache_size,
        "prompt_cache_bytes": args.prompt_cache_bytes,
    }
    engine_args.update(kv_cache_from(args))
    split_template(template)  # before the model loads
    group = start_ranks()
    refuse_launched(group, "--draft-model", args.draft_model)
    refuse_launched(group, "--prompt-lookup-tokens", args.prompt_lookup_tokens)
    spinner = Renderer().spinner
    model, tokenizer, _ = load_model(args.model, args.revision, spinner, args.adapter_path, group)
    if group.rank() != 0:
        follow(model, tokenizer, group, engine_args)
        return 0
    if group.size() > 1:
        stop_with_launcher()
    engine_args.update(load_draft(args, model, tokenizer, spinner))
    serve(
        model,
        tokenizer,
        args.model_id or args.model,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        engine_args=engine_args,
        api_key=args.api_key,
        max_prompt_tokens=args.max_prompt_tokens,
        max_body_bytes=args.max_body_bytes,
        chat_template=template,
        max_model_len=args.max_model_len,
        allowed_origins=args.allowed_origins,
        group=group,
    )
    return 0
