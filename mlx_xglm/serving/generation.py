"""One request's rows on the engine, and the choices they fill, for both generation endpoints."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

from .choices import Choice
from .engine import Engine
from .errors import APIError, error_body
from .jobs import Failed, Job, Sampling
from .protocol import _Sampling

# How often a request that is not streamed checks whether its client is still there, in seconds.
DISCONNECT_POLL = 0.5
TOKEN_ID = re.compile(r"[0-9]{1,12}")


def sampling_from(body: _Sampling, vocab_size: int) -> Sampling:
    """The engine's sampling settings of a request; logit_bias keys must be token ids in the vocabulary."""
    bias = None
    if body.logit_bias:
        bias = {}
        for key, value in body.logit_bias.items():
            # ASCII digits only: str.isdigit and int() also take "²" or "١", and int() no huge numbers.
            if not (TOKEN_ID.fullmatch(key) and int(key) < vocab_size):
                shown = key if len(key) <= 20 else key[:20] + "..."
                raise APIError(400, f"logit_bias key {shown!r} is not a token id of this model", "logit_bias")
            bias[int(key)] = value
    return Sampling(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        logit_bias=bias,
        seed=body.seed,
    )


class Generation:
    """The choices of one response, `n` per prompt, and the engine rows that fill them."""

    def __init__(self, engine: Engine, choices: list[Choice]):
        self.engine = engine
        self.choices = choices
        self.events: asyncio.Queue = asyncio.Queue()
        self.jobs: list[Job] = []
        self._checked = 0.0  # the event loop's time of the last disconnect check

    def start(self, prompts: list[list[int]], max_tokens: int, sampling: Sampling, n: int, logprobs):
        """Hand the rows to the engine; a 503 (queue full) leaves none of them running."""
        for p, ids in enumerate(prompts):
            job = Job(ids, max_tokens, sampling, n=n, index=p * n, logprobs=logprobs, events=self.events)
            try:
                self.engine.submit(job)
            except APIError:
                self.cancel()
                raise
            self.jobs.append(job)

    def cancel(self) -> None:
        for job in self.jobs:
            self.engine.cancel(job)

    async def _next_event(self, request):
        if request is None:
            return await self.events.get()
        # Checked on a clock, not only while no token comes: a row that keeps producing tokens would
        # otherwise go on for a client that has gone.
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() - self._checked >= DISCONNECT_POLL:
                self._checked = loop.time()
                if await request.is_disconnected():
                    raise ConnectionAbortedError("the client went away")
            try:
                return await asyncio.wait_for(self.events.get(), DISCONNECT_POLL)
            except asyncio.TimeoutError:
                pass

    async def updates(self, request=None) -> AsyncIterator[tuple[Choice, str]]:
        """Yield `(choice, new text)` per token until every choice has finished.

        A choice that stops on a stop string gives its row back at once. If the caller stops early (the
        client went away; pass `request` to have a response that is not streamed notice that), every row
        still running is removed from the batch.
        """
        try:
            while any(c.finish_reason is None for c in self.choices):
                event = await self._next_event(request)
                if isinstance(event, Failed):
                    raise event.error
                choice = self.choices[event.choice]
                was_running = choice.finish_reason is None
                text = choice.add(event)
                if was_running and choice.finish_reason is not None and event.finish_reason is None:
                    # Stopped by the text (a stop string, </s>) before the engine ended the row.
                    job = next(j for j in self.jobs if j.index <= event.choice < j.index + j.n)
                    self.engine.cancel(job, event.choice)
                if was_running:
                    yield choice, text
        finally:
            if any(c.finish_reason is None for c in self.choices):
                self.cancel()

    def usage(self, prompt_tokens: int) -> dict:
        completion = sum(c.generated for c in self.choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def sse_error(error: APIError) -> str:
    """An error met after the stream began: sent as an event, since the status line has gone out."""
    return sse(error_body(error.status, error.message, error.param, error.code))
