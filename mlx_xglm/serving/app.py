"""The OpenAI-compatible FastAPI app: endpoints, limits and the engine's lifetime."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from ..tokenization.prompt import DEFAULT_TEMPLATE, split_template
from .chat_completions import create_chat_completion
from .completions import create_completion
from .engine import Engine
from .errors import APIError, install_error_handlers
from .gate import DEFAULT_BODY_TIMEOUT, Gate
from .metrics import RequestCounter, render
from .prompts import chat_prompt, check_ids
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass
class ServerState:
    """What the endpoints share: the engine, the tokenizer, the served model's name and the limits."""

    engine: Engine
    tokenizer: object
    model_id: str
    vocab_size: int
    max_prompt_tokens: int
    max_model_len: int
    chat_template: str = DEFAULT_TEMPLATE
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(
    engine: Engine,
    model_id: str,
    *,
    api_key: str | None = None,
    max_prompt_tokens: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    chat_template: str = DEFAULT_TEMPLATE,
    max_model_len: int | None = None,
    allowed_origins: list[str] | None = None,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
) -> FastAPI:
    """The server app around a (not yet started) `engine`, which it starts and shuts down with itself.

    `model_id` is the name /v1/models reports and responses carry. With `api_key` every request needs
    `Authorization: Bearer <api_key>`. Prompts over `max_prompt_tokens` (default: the model's
    `max_position_embeddings`) and bodies over `max_body_bytes` get a 413. `chat_template` writes the
    chat transcript as `mlx-xglm chat --template` does. `max_model_len` (default: the longer of
    `max_prompt_tokens` and `max_position_embeddings`) bounds prompt plus `max_tokens`, as vLLM's.
    `allowed_origins` lets browser pages of those origins call the API (CORS; "*" for any; default none).
    A body not fully received within `body_timeout` seconds gets a 408. `/health` needs no key.
    """
    split_template(chat_template)
    config = engine.model.config
    max_prompt_tokens = max_prompt_tokens or config.max_position_embeddings
    state = ServerState(
        engine=engine,
        tokenizer=engine.tokenizer,
        model_id=model_id,
        vocab_size=config.vocab_size,
        max_prompt_tokens=max_prompt_tokens,
        max_model_len=max_model_len or max(max_prompt_tokens, config.max_position_embeddings),
        chat_template=chat_template,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="mlx-xglm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    install_error_handlers(app)
    requests = RequestCounter()
    app.add_middleware(
        Gate, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout=body_timeout, requests=requests
    )
    if allowed_origins:
        # Outside the gate: a browser's preflight carries no key, and its answers need the CORS headers.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=allowed_origins,
            allow_methods=["GET", "POST", "HEAD", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok", **engine.stats()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(render(requests, engine.metrics()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        card = {"id": model_id, "object": "model", "created": state.created, "owned_by": "mlx-xglm"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(body, request, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await create_chat_completion(body, request, state)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        tokenizer = state.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", "prompt")
        if body.messages is not None:
            args = (chat_prompt, body.messages, tokenizer, state.chat_template, state.vocab_size, 1 << 62)
            tokens = await run_in_threadpool(*args)
        else:
            special = body.add_special_tokens
            tokens = await run_in_threadpool(tokenizer.encode, body.prompt, add_special_tokens=special)
        return {"count": len(tokens), "max_model_len": state.max_prompt_tokens, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if body.tokens:
            check_ids(body.tokens, state.vocab_size, 1 << 62, "tokens")
        return {"prompt": await run_in_threadpool(state.tokenizer.decode, body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tokenizer = state.tokenizer
        return {
            "tokenizer_class": "XGLMTokenizer",
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "unk_token": tokenizer.unk_token,
            "model_max_length": state.max_prompt_tokens,
        }

    return app
