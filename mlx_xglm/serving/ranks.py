"""The server across the ranks of `mlx.launch` (tensor parallel): rank 0 listens and answers; before each
engine step it shares the step's commands (new requests, cancellations, scoring, stop) with the other
ranks, which replay them on their own engine, so that every rank runs the same batch and the model's
collectives meet. A request without a seed gets one from rank 0, so every rank samples the same tokens.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, replace

import mlx.core as mx

from ..decoding.rows import generation_stream
from ..world import all_gather_json
from .engine import Engine
from .jobs import Job, Sampling


def settle() -> None:
    """Finish the queued steps, whose collectives must come first and in the same order on every rank."""
    mx.synchronize(generation_stream())
    mx.synchronize()


class LeaderEngine(Engine):
    """Rank 0's engine: an Engine that sends every step's commands to the other ranks."""

    def __init__(self, model, tokenizer, group, **engine_args):
        super().__init__(model, tokenizer, **engine_args)
        self.group = group
        self._keys = itertools.count()

    def submit(self, job: Job) -> None:
        if job.sampling.seed is None and job.sampling.temperature > 0:
            job.sampling = replace(job.sampling, seed=random.getrandbits(31))
        super().submit(job)

    def _collect(self, stalled: bool) -> list[tuple[str, object]]:
        commands = super()._collect(stalled)
        settle()
        all_gather_json([self._describe(kind, payload) for kind, payload in commands], self.group)
        return commands

    def _describe(self, kind: str, payload) -> dict:
        if kind == "insert":
            payload.key = next(self._keys)
            fields = ("key", "prompt", "max_tokens", "n", "index", "logprobs")
            sampling = asdict(payload.sampling)
            if sampling["logit_bias"] is not None:
                sampling["logit_bias"] = [[int(k), v] for k, v in sampling["logit_bias"].items()]
            return {"kind": kind, "sampling": sampling, **{f: getattr(payload, f) for f in fields}}
        if kind == "remove":
            job, choice = payload
            return {"kind": kind, "key": job.key, "choice": choice}
        if kind == "score":
            ids, top, _ = payload
            return {"kind": kind, "ids": ids, "top": top}
        return {"kind": kind}


class _Replayed(Job):
    """A request replayed on a rank other than 0: nobody listens to its events."""

    def post(self, event) -> None:
        pass


class FollowerEngine(Engine):
    """The engine of a rank other than 0: runs on the calling thread the commands rank 0 shares, until
    rank 0 stops."""

    def __init__(self, model, tokenizer, group, **engine_args):
        super().__init__(model, tokenizer, **engine_args)
        self.group = group
        self._jobs: dict[int, Job] = {}

    def run(self) -> None:
        self._run()

    def _collect(self, stalled: bool) -> list[tuple[str, object]]:
        settle()
        described = all_gather_json([], self.group)[0]
        return [self._rebuild(d) for d in described]

    def _rebuild(self, d: dict) -> tuple[str, object]:
        kind = d["kind"]
        if kind == "insert":
            sampling = d["sampling"]
            if sampling["logit_bias"] is not None:
                sampling["logit_bias"] = dict(map(tuple, sampling["logit_bias"]))
            fields = {f: d[f] for f in ("prompt", "max_tokens", "n", "index", "logprobs")}
            job = _Replayed(sampling=Sampling(**sampling), loop=None, events=None, **fields)
            self._jobs[d["key"]] = job
            return kind, job
        if kind == "remove":
            return kind, (self._jobs[d["key"]], d["choice"])
        if kind == "score":
            return kind, (d["ids"], d["top"], None)
        return kind, None

    def _on_score(self, generator, payload) -> None:
        ids, top, _ = payload
        # As rank 0 scores, through its prefix cache: the same passes, so the collectives meet.
        self._score(ids, top)
