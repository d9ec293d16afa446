"""What handlers and the engine thread pass each other: jobs, their sampling settings, and their events."""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field

import mlx.core as mx

from ..decoding.sample_utils import greedy, make_sampler
from .errors import APIError


@dataclass
class Sampling:
    """How one request's rows pick tokens; built into MLX samplers on the engine thread."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None


@dataclass
class Token:
    """One generated token of choice `choice`: its log-probability and the `top` alternatives when asked."""

    choice: int
    token: int | None  # None: the row was cancelled before it made another token
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


@dataclass
class Failed:
    """The engine could not run the job; the handler answers with `error` (a 500 unless it says otherwise)."""

    error: APIError


@dataclass
class Job:
    """`n` rows continuing one prompt, choices `index` to `index + n - 1` of their response.

    Events (Token, Failed) arrive on `events`, read on `loop`; several jobs of one request may share them.
    `logprobs` asks for each token's log-probability and that many likeliest alternatives.
    """

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    n: int = 1
    index: int = 0
    logprobs: int | None = None
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    uids: list[int] = field(default_factory=list)
    live: int = 0

    def post(self, event) -> None:
        # RuntimeError: the event loop has closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def _seeded(sampler, seed: int):
    """`sampler` drawing from its own sequence of keys, so a seeded row samples the same beside any other
    rows: each draw seeds MLX's generator from (`seed`, draw number), then reseeds it from the OS."""
    draws = 0

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal draws
        mx.random.seed((seed * 1_000_003 + draws) % 2**63)
        draws += 1
        try:
            return sampler(logprobs)
        finally:
            mx.random.seed(random.getrandbits(63))

    return sample


def row_samplers(sampling: Sampling, n: int) -> list:
    """One sampler per row; seeded rows each draw from their own sequence."""
    sampler = make_sampler(
        temp=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, min_p=sampling.min_p
    )
    if sampling.seed is None or sampler is greedy:
        return [sampler] * n
    return [_seeded(sampler, sampling.seed * 7919 + i) for i in range(n)]
