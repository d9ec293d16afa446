"""`POST /v1/completions`: OpenAI's legacy completions, with `echo` and prompt log-probabilities."""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..decoding.stop_strings import StopStrings
from .choices import Choice, completion_logprobs
from .errors import APIError
from .generation import Generation, sampling_from, sse, sse_error
from .prompts import completion_prompts, prompt_list, token_budget
from .protocol import CompletionRequest

DEFAULT_MAX_TOKENS = 16  # OpenAI's


async def create_completion(body: CompletionRequest, request: Request, state):
    """Answer a completions request, streamed as server-sent events when `stream` is set."""
    tokenizer = state.tokenizer
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens must be at least 1 (0 only with echo)", "max_tokens")
    texts = prompt_list(body.prompt)
    state.engine.check_room(len(texts) * body.n)
    sampling = sampling_from(body, state.vocab_size)
    prompts = await run_in_threadpool(
        completion_prompts, texts, tokenizer, state.vocab_size, state.max_prompt_tokens
    )
    max_tokens = token_budget(body.max_tokens, DEFAULT_MAX_TOKENS, prompts, state.max_model_len)
    stops = StopStrings(body.stop_strings)
    choices = [Choice(tokenizer, i, stops) for i in range(len(prompts) * body.n)]
    if body.echo:
        want_scores = body.logprobs is not None
        for p, ids in enumerate(prompts):
            scores = await state.engine.score(ids, body.logprobs) if want_scores else None
            for choice in choices[p * body.n : (p + 1) * body.n]:
                choice.echo(ids, scores)
    generation = Generation(state.engine, choices)
    if max_tokens:
        generation.start(prompts, max_tokens, sampling, body.n, body.logprobs)
    else:
        for choice in choices:
            choice.finish_reason = "length"
    prompt_tokens = sum(len(ids) for ids in prompts)
    meta = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_id,
    }
    request.state.prompt_tokens = prompt_tokens
    if body.stream:
        events = _stream(generation, body, meta, prompt_tokens, request, tokenizer)
        return StreamingResponse(events, media_type="text/event-stream")
    async for _ in generation.updates(request):
        pass
    request.state.generated_tokens = sum(c.generated for c in choices)
    return {
        **meta,
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": completion_logprobs(tokenizer, c.entries) if body.logprobs is not None else None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": generation.usage(prompt_tokens),
    }


def _chunk(meta: dict, choice: Choice, text: str, body: CompletionRequest, tokenizer) -> dict:
    logprobs = None
    if body.logprobs is not None:
        logprobs = completion_logprobs(tokenizer, choice.new_entries())
    item = {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason}
    return {**meta, "choices": [item], **({"usage": None} if body.include_usage else {})}


async def _stream(generation: Generation, body: CompletionRequest, meta, prompt_tokens, request, tokenizer):
    try:
        if body.echo:
            for choice in generation.choices:
                yield sse(_chunk(meta, choice, choice.text, body, tokenizer))
        async for choice, text in generation.updates():
            if text or choice.finish_reason is not None or body.logprobs is not None:
                yield sse(_chunk(meta, choice, text, body, tokenizer))
        if body.include_usage:
            yield sse({**meta, "choices": [], "usage": generation.usage(prompt_tokens)})
    except APIError as e:
        yield sse_error(e)
    finally:
        request.state.generated_tokens = sum(c.generated for c in generation.choices)
    yield sse("[DONE]")
