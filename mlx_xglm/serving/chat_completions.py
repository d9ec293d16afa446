"""`POST /v1/chat/completions`: messages written as the `mlx-xglm chat` transcript, answered by a base model.

The answer ends where the model ends its line (`</s>`), at the next user marker of the template, at a
stop string, or after `max_tokens` (default: `mlx-xglm chat`'s 256).
"""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..decoding.stop_strings import StopStrings
from ..tokenization.prompt import user_marker
from .choices import Choice, chat_logprobs
from .errors import APIError
from .generation import Generation, sampling_from, sse, sse_error
from .prompts import chat_prompt, token_budget
from .protocol import ChatCompletionRequest

DEFAULT_MAX_TOKENS = 256


async def create_chat_completion(body: ChatCompletionRequest, request: Request, state):
    """Answer a chat request, streamed as server-sent events when `stream` is set."""
    tokenizer = state.tokenizer
    state.engine.check_room(body.n)
    sampling = sampling_from(body, state.vocab_size)
    ids = await run_in_threadpool(
        chat_prompt, body.messages, tokenizer, state.chat_template, state.vocab_size, state.max_prompt_tokens
    )
    max_tokens = token_budget(body.token_limit, DEFAULT_MAX_TOKENS, [ids], state.max_model_len)
    marker = user_marker(state.chat_template)
    stop = ([marker] if marker else []) + body.stop_strings
    stops = StopStrings(stop)
    choices = [Choice(tokenizer, i, stops) for i in range(body.n)]
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    generation = Generation(state.engine, choices)
    generation.start([ids], max_tokens, sampling, body.n, logprobs)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_id}
    request.state.prompt_tokens = len(ids)
    if body.stream:
        events = _stream(generation, body, meta, len(ids), request, tokenizer)
        return StreamingResponse(events, media_type="text/event-stream")
    async for _ in generation.updates(request):
        pass
    request.state.generated_tokens = sum(c.generated for c in choices)
    return {
        **meta,
        "object": "chat.completion",
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(tokenizer, c.entries) if body.logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": generation.usage(len(ids)),
    }


def _chunk(meta: dict, index: int, delta: dict, finish_reason, body: ChatCompletionRequest, logprobs=None):
    item = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    chunk = {**meta, "object": "chat.completion.chunk", "choices": [item]}
    return {**chunk, "usage": None} if body.include_usage else chunk


async def _stream(
    generation: Generation, body: ChatCompletionRequest, meta, prompt_tokens, request, tokenizer
):
    try:
        for choice in generation.choices:
            yield sse(_chunk(meta, choice.index, {"role": "assistant", "content": ""}, None, body))
        async for choice, text in generation.updates():
            entries = choice.new_entries() if body.logprobs else []
            logprobs = chat_logprobs(tokenizer, entries) if entries else None
            if text or entries:
                yield sse(_chunk(meta, choice.index, {"content": text}, None, body, logprobs))
            if choice.finish_reason is not None:
                yield sse(_chunk(meta, choice.index, {}, choice.finish_reason, body))
        if body.include_usage:
            usage = generation.usage(prompt_tokens)
            yield sse({**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage})
    except APIError as e:
        yield sse_error(e)
    finally:
        request.state.generated_tokens = sum(c.generated for c in generation.choices)
    yield sse("[DONE]")
