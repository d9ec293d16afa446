"""The bridge between asyncio request handlers and the model: one engine thread owns both.

The thread holds the model and a `BatchGenerator` (continuous batching: a request's rows join the running
batch at the next step). Handlers hand work over through a thread-safe queue, and get their tokens back
through their own asyncio queue. Nothing but the engine thread touches MLX.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading

from ..decoding.cache import check_kv_bits, make_prompt_cache
from ..decoding.engine import BatchGenerator
from ..decoding.prefix_cache import DEFAULT_PROMPT_CACHE_SIZE, PrefixCache
from ..decoding.sample_utils import make_logits_processors
from ..decoding.solo import SoloGenerator
from .errors import APIError
from .jobs import Failed, Job, Token, row_samplers
from .scoring import prompt_logprobs, top_logprobs

log = logging.getLogger("mlx_xglm.serving")

# Seconds the engine thread waits for work when its rows gave no token in the last step.
STALL_WAIT = 0.01


class Engine:
    """Runs `model` for many requests at once on its own thread.

    `max_batch` rows decode together; up to `max_queue` more wait for a place, and a request that would
    go past that gets a 503. `prefill_step_size`, `max_kv_size`, `kv_bits`, `kv_group_size`
    and `quantized_kv_start` go to the BatchGenerator. With `draft_model` (`num_draft_tokens`) or
    `prompt_lookup_num_tokens`, rows decode one at a time by speculative or prompt-lookup decoding
    (`SoloGenerator`), as mlx-lm's server does with a draft model. A prefix cache of
    `prompt_cache_size` entries and at most `prompt_cache_bytes` bytes (None: no bound; either 0 turns
    it off) keeps finished rows' and scored prompts' caches, and a prompt that starts like one of them
    reads only the rest (not with `kv_bits`, nor with rows decoded one at a time). Call `start()` once
    an event loop runs, `shutdown()` to cancel every row and end the thread.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        prefill_step_size: int = 512,
        max_kv_size: int | None = None,
        prompt_cache_size: int = DEFAULT_PROMPT_CACHE_SIZE,
        prompt_cache_bytes: int | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        quantized_kv_start: int = 0,
        draft_model=None,
        num_draft_tokens: int = 3,
        prompt_lookup_num_tokens: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.capacity = max_batch + max_queue
        self._generator_args = {
            "completion_batch_size": max_batch,
            "prefill_batch_size": min(max_batch, 8),
            "prefill_step_size": prefill_step_size,
        }
        if max_kv_size is not None:
            self._generator_args["max_kv_size"] = max_kv_size
        if kv_bits is not None:
            check_kv_bits(kv_bits, kv_group_size, quantized_kv_start, max_kv_size, model.config.head_dim)
            self._generator_args.update(
                kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start
            )
        self._solo_args = {}
        if draft_model is not None or prompt_lookup_num_tokens is not None:
            self._solo_args = {
                "draft_model": draft_model,
                "num_draft_tokens": num_draft_tokens,
                "prompt_lookup_num_tokens": prompt_lookup_num_tokens,
            }
            SoloGenerator(model, **self._solo_args, **self._cache_args())  # refuse bad settings now
        self.max_kv_size = max_kv_size
        self.prefix_cache = None
        # Quantized batches and rows decoded one at a time give no caches back to keep.
        if prompt_cache_size != 0 and prompt_cache_bytes != 0 and kv_bits is None and not self._solo_args:
            self.prefix_cache = PrefixCache(prompt_cache_size, prompt_cache_bytes)
        # Totals for /metrics, written by the engine thread only.
        self._counts = dict.fromkeys(
            ["prompt_tokens_total", "prompt_tokens_cached_total", "generation_tokens_total"], 0
        )
        self._decoding = self._waiting = 0
        self._generated: dict[int, list[int]] = {}  # uid -> tokens so far, engine thread only
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._rows = 0  # rows admitted and not yet finished, counted on the handlers' side
        self._running: dict[int, tuple[Job, int]] = {}  # uid -> (job, choice), engine thread only
        self._thread = threading.Thread(target=self._run, name="mlx-xglm-engine", daemon=True)
        self._stopping = threading.Event()

    # Handlers' side (the event loop's thread).

    def start(self) -> None:
        self._thread.start()

    def _admit(self, rows: int) -> None:
        with self._lock:
            if self._stopping.is_set():
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if self._rows + rows > self.capacity:
                raise APIError(
                    503,
                    f"the server is busy ({self._rows} rows running or queued); retry shortly",
                    code="queue_full",
                )
            self._rows += rows

    def check_room(self, rows: int) -> None:
        """Before any work for a request of `rows` rows: a 400 if it can never fit, a 503 if not now."""
        if rows > self.capacity:
            raise APIError(
                400,
                f"the request asks for {rows} rows (prompts times n); this server holds at most "
                f"{self.capacity} at once",
                "n",
                "too_many_rows",
            )
        with self._lock:
            if self._rows + rows > self.capacity:
                raise APIError(
                    503,
                    f"the server is busy ({self._rows} rows running or queued); retry shortly",
                    code="queue_full",
                )

    def _release(self, rows: int) -> None:
        with self._lock:
            self._rows -= rows

    def submit(self, job: Job) -> None:
        """Queue `job`'s rows; an APIError 503 when the queue is full or the server is stopping."""
        self._admit(job.n)
        job.live = job.n
        self._inbox.put(("insert", job))

    def cancel(self, job: Job, choice: int | None = None) -> None:
        """Remove the row of `choice`, or every row of `job` still running (its client went away)."""
        self._inbox.put(("remove", (job, choice)))

    async def score(self, ids: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
        """Log-probability of each prompt token after the first, with the `top` likeliest alternatives."""
        self._admit(1)
        future = asyncio.get_running_loop().create_future()
        self._inbox.put(("score", (ids, top, future)))
        try:
            return await future
        finally:
            self._release(1)

    def stats(self) -> dict:
        with self._lock:
            rows = self._rows
        return {"rows": rows, "running": len(self._running), "max_batch": self.max_batch}

    def metrics(self) -> dict:
        """The engine's gauges and totals for /metrics (see metrics.py for their meaning)."""
        prefix = self.prefix_cache
        return {
            **self._counts,
            "active_rows": self._decoding,
            "queued_rows": self._waiting,
            "prefix_cache_bytes": prefix.nbytes if prefix else 0,
            "prefix_cache_entries": len(prefix) if prefix else 0,
            "prefix_cache_hits_total": prefix.hits if prefix else 0,
            "prefix_cache_misses_total": prefix.misses if prefix else 0,
        }

    def stop_soon(self) -> None:
        """Stop taking requests and cancel the running rows (finish reason "abort"); returns at once."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
        self._inbox.put(("stop", None))

    def shutdown(self, timeout: float = 5.0) -> None:
        """`stop_soon`, then wait up to `timeout` seconds for the engine thread to end."""
        self.stop_soon()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # The engine thread.

    def _run(self) -> None:
        generator = self._new_generator()
        stalled = False
        while True:
            for kind, payload in self._collect(stalled):
                if kind == "stop":
                    self._finish_all(generator, "abort")
                    return
                try:
                    getattr(self, f"_on_{kind}")(generator, payload)
                except Exception:  # one bad command must not take the engine down
                    log.exception("engine command %s failed", kind)
            if not self._running:
                continue
            try:
                responses = generator.next()
                stalled = not responses
                self._decoding, self._waiting = generator.num_active, generator.num_waiting
                self._deliver(responses)
            except Exception:
                log.exception("a decoding step failed; failing its requests and starting a fresh batch")
                self._fail_all(APIError(500, "decoding failed on the server; see its log"))
                generator = self._new_generator()

    def _collect(self, stalled: bool) -> list[tuple[str, object]]:
        """The commands for the next step: waits for one when no row runs, a moment when `stalled`."""
        commands = []
        if not self._running:
            commands.append(self._inbox.get())
        elif stalled:  # rows are waiting but the last step gave no token: do not spin
            with contextlib.suppress(queue.Empty):
                commands.append(self._inbox.get(timeout=STALL_WAIT))
        while not self._inbox.empty():
            commands.append(self._inbox.get())
        return commands

    def _cache_args(self) -> dict:
        names = ("kv_bits", "kv_group_size", "quantized_kv_start")
        return {k: v for k, v in self._generator_args.items() if k in names}

    def _new_generator(self) -> BatchGenerator | SoloGenerator:
        stop = {self.tokenizer.eos_token_id}
        if self._solo_args:  # speculative or prompt-lookup decoding: one row at a time
            step = self._generator_args["prefill_step_size"]
            return SoloGenerator(
                self.model, stop_tokens=stop, prefill_step_size=step, **self._solo_args, **self._cache_args()
            )
        return BatchGenerator(self.model, stop_tokens=stop, **self._generator_args)

    def _on_insert(self, generator: BatchGenerator, job: Job) -> None:
        try:
            samplers = row_samplers(job.sampling, job.n)
            sampling = job.sampling
            processors = make_logits_processors(
                logit_bias=sampling.logit_bias,
                repetition_penalty=sampling.repetition_penalty,
                frequency_penalty=sampling.frequency_penalty,
                presence_penalty=sampling.presence_penalty,
            )
            cached, cache = self._cached_beginning(job)
            uids = generator.insert(
                [job.prompt[cached:]] * job.n,
                max_tokens=[job.max_tokens] * job.n,
                caches=None if cache is None else [cache] * job.n,
                samplers=samplers,
                logits_processors=[processors] * job.n,
            )
        except Exception as e:
            log.exception("could not start a request")
            self._release(job.n)
            job.post(Failed(APIError(400 if isinstance(e, ValueError) else 500, str(e))))  # XGLMError too
            return
        job.uids = list(uids)
        self._counts["prompt_tokens_total"] += len(job.prompt) * job.n
        self._counts["prompt_tokens_cached_total"] += cached * job.n
        for row, uid in enumerate(uids):
            self._running[uid] = (job, job.index + row)
            self._generated[uid] = []

    def _cached_beginning(self, job: Job) -> tuple[int, list | None]:
        """How many of the job's prompt tokens the prefix cache holds, and a cache of them (or None)."""
        # A repetition penalty looks at the prompt, and a row continuing a cache sees only the rest of it.
        if self.prefix_cache is None or job.sampling.repetition_penalty:
            return 0, None
        hit = self.prefix_cache.fetch(job.prompt)
        return hit.length, hit.cache

    def _on_remove(self, generator: BatchGenerator, payload: tuple[Job, int | None]) -> None:
        job, choice = payload
        uids = job.uids if choice is None else job.uids[choice - job.index : choice - job.index + 1]
        gone = [uid for uid in uids if uid in self._running]
        if gone:
            generator.remove(gone)
            for uid in gone:
                del self._running[uid]
                del self._generated[uid]
            self._release(len(gone))

    def _on_score(self, generator: BatchGenerator, payload) -> None:
        ids, top, future = payload
        loop = future.get_loop()
        try:
            result = self._score(ids, top)
        except Exception as e:
            log.exception("scoring a prompt failed")
            loop.call_soon_threadsafe(_settle, future, None, e)
            return
        loop.call_soon_threadsafe(_settle, future, result, None)

    def _score(self, ids: list[int], top: int) -> list:
        """`prompt_logprobs` of `ids`, continuing from (and then filling) the prefix cache."""
        self._counts["prompt_tokens_total"] += len(ids)
        # Scored prompts' caches keep every position, which a generator with a window cannot continue.
        if self.prefix_cache is None or self.max_kv_size is not None or len(ids) < 2:
            return prompt_logprobs(self.model, ids, top)
        hit = self.prefix_cache.fetch(ids, top=top)
        cache = hit.cache if hit.cache is not None else make_prompt_cache(self.model)
        result = (hit.scores or []) + prompt_logprobs(self.model, ids, top, cache=cache)
        self._counts["prompt_tokens_cached_total"] += hit.length
        self.prefix_cache.insert(ids, cache, scores=result, top=top)
        return result

    def _deliver(self, responses: list) -> None:
        wanted = [(r, self._running[r.uid]) for r in responses if r.uid in self._running]
        asked = [(r, job) for r, (job, _) in wanted if job.logprobs is not None]
        scored = top_logprobs(
            [r.logprobs for r, _ in asked], [r.token for r, _ in asked], [j.logprobs for _, j in asked]
        )
        by_uid = {r.uid: s for (r, _), s in zip(asked, scored, strict=True)}
        for r, (job, choice) in wanted:
            logprob, top = by_uid.get(r.uid, (None, None))
            job.post(Token(choice, r.token, logprob, top, r.finish_reason))
            self._generated[r.uid].append(r.token)
            self._counts["generation_tokens_total"] += 1
            if r.finish_reason is not None:
                del self._running[r.uid]
                generated = self._generated.pop(r.uid)
                if self.prefix_cache is not None:
                    self.prefix_cache.insert(job.prompt + generated, r.prompt_cache)
                self._release(1)

    def _finish_all(self, generator: BatchGenerator, reason: str) -> None:
        if self._running:
            generator.remove(list(self._running))
        for job, choice in self._running.values():
            job.post(Token(choice, None, finish_reason=reason))
        self._release(len(self._running))
        self._running.clear()
        self._generated.clear()

    def _fail_all(self, error: APIError) -> None:
        for job in {id(job): job for job, _ in self._running.values()}.values():
            job.post(Failed(error))
        self._release(len(self._running))
        self._running.clear()
        self._generated.clear()


def _settle(future: asyncio.Future, result, error: Exception | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(APIError(500, "scoring the prompt failed on the server; see its log"))
    else:
        future.set_result(result)
