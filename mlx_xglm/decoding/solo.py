"""SoloGenerator: BatchGenerator's API over decoding loops that do not batch, one row at a time.

Speculative decoding with a draft model and prompt-lookup decoding verify a different number of tokens per
row each round, so their rows decode one after another (mlx-lm's server does not batch with a draft model
either). `next()` hands out one token of every row; a row's round runs when its earlier tokens are used up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx

from ..errors import XGLMError
from .engine import BatchStats, Response, row_settings
from .prompt_lookup import prompt_lookup_generate_step
from .sample_utils import Sampler, greedy
from .speculative import check_draft_model, speculative_generate_step


@dataclass
class _Row:
    steps: object
    max_tokens: int
    count: int = 0


class SoloGenerator:
    """Rows decoded one at a time by `speculative_generate_step` (with `draft_model`) or
    `prompt_lookup_generate_step` (with `prompt_lookup_num_tokens`), behind `BatchGenerator`'s `insert`,
    `remove`, `next`, `stats`, `num_active` and `num_waiting`. `max_tokens`, `stop_tokens` and `sampler`
    are as BatchGenerator's; `cache_args` (`kv_bits`, `kv_group_size`, `quantized_kv_start`) go to
    prompt-lookup decoding.
    """

    def __init__(
        self,
        model,
        *,
        draft_model=None,
        num_draft_tokens: int = 3,
        prompt_lookup_num_tokens: int | None = None,
        max_tokens: int = 256,
        stop_tokens=None,
        sampler: Sampler | None = None,
        prefill_step_size: int = 512,
        **cache_args,
    ):
        if (draft_model is None) == (prompt_lookup_num_tokens is None):
            raise XGLMError(
                "give a draft model or prompt_lookup_num_tokens (one of them)",
                param="prompt_lookup_num_tokens",
            )
        if draft_model is not None:
            check_draft_model(model, draft_model)
            if cache_args.get("kv_bits") is not None:
                raise XGLMError("speculative decoding with a draft model keeps float caches", param="kv_bits")
            self._options = {"draft_model": draft_model, "num_draft_tokens": num_draft_tokens}
        else:
            self._options = {"prompt_lookup_num_tokens": prompt_lookup_num_tokens, **cache_args}
        self.model = model
        self.max_tokens = max_tokens
        self.stop_tokens = set(stop_tokens or ())
        self.sampler = sampler or greedy
        self.prefill_step_size = prefill_step_size
        self._rows: dict[int, _Row] = {}
        self._next_uid = 0
        self._stats = BatchStats()

    def _steps(self, prompt: list[int], limit: int, sampler, processors):
        options = dict(self._options)
        kwargs = {
            "max_tokens": limit,
            "sampler": sampler,
            "logits_processors": processors,
            "prefill_step_size": self.prefill_step_size,
        }
        if "draft_model" in options:
            draft = options.pop("draft_model")
            return speculative_generate_step(mx.array(prompt), self.model, draft, **options, **kwargs)
        return prompt_lookup_generate_step(mx.array(prompt), self.model, **options, **kwargs)

    def insert(
        self, prompts, max_tokens=None, caches=None, samplers=None, logits_processors=None
    ) -> list[int]:
        """Queue `prompts` (lists of token ids) as `BatchGenerator.insert` does; prompt caches are refused."""
        if caches is not None and any(c is not None for c in caches):
            raise XGLMError("rows decoded one at a time start without a prompt cache", param="caches")
        settings = row_settings(self.model, prompts, max_tokens, samplers, logits_processors, self.max_tokens)
        uids = []
        for prompt, (limit, sampler, procs) in zip(prompts, settings, strict=True):
            steps = self._steps(list(prompt), limit, sampler or self.sampler, procs)
            self._rows[self._next_uid] = _Row(steps, limit)
            self._stats.prompt_tokens += len(prompt)
            uids.append(self._next_uid)
            self._next_uid += 1
        return uids

    @property
    def num_active(self) -> int:
        """Rows decoding now (each reads its prompt at its first `next`)."""
        return len(self._rows)

    @property
    def num_waiting(self) -> int:
        """Rows waiting for a place: none, every inserted row decodes."""
        return 0

    def remove(self, uids) -> None:
        """Drop the rows with these uids; unknown uids are ignored."""
        for uid in uids:
            row = self._rows.pop(uid, None)
            if row is not None:
                row.steps.close()

    def next(self) -> list[Response]:
        """One token for every row (an empty list when none is left), as `BatchGenerator.next`."""
        tic = time.perf_counter()
        responses = []
        for uid, row in list(self._rows.items()):
            token, logprobs, _ = next(row.steps)
            row.count += 1
            if token in self.stop_tokens:
                reason = "stop"
            elif row.count >= row.max_tokens:
                reason = "length"
            else:
                reason = None
            if reason is not None:
                self.remove([uid])
            responses.append(Response(uid, token, logprobs, reason))
        self._stats.generation_tokens += len(responses)
        self._stats.generation_time += time.perf_counter() - tic
        return responses

    def stats(self) -> BatchStats:
        """Totals so far: prompt and generated tokens, the generation rate, and peak memory (GB)."""
        s = self._stats
        s.generation_tps = s.generation_tokens / max(s.generation_time, 1e-9)
        s.peak_memory = mx.get_peak_memory() / 1e9
        return s
