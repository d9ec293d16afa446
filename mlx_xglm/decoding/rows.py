"""The decoding step every loop shares: rows of a batch, their cache, sampling with per-row settings.

`Rows` is what `BatchGenerator` keeps for the rows decoding together and what `generate_step` keeps for
its one row: the model is called once per step for all rows, logits processors and samplers act per row,
and each step is queued (`mx.async_eval`) before the tokens of the previous one are read.
"""

from __future__ import annotations

import threading

import mlx.core as mx

from .sample_utils import LogitsProcessor, Sampler

_thread = threading.local()


def generation_stream() -> mx.Stream:
    """The calling thread's generation stream, made on first use: MLX streams belong to the thread that
    made them, and the server decodes on a thread of its own. Generation runs on its own stream so queued
    work of the caller does not interleave with it."""
    stream = getattr(_thread, "stream", None)
    if stream is None:
        stream = _thread.stream = mx.new_stream(mx.default_device())
    return stream


# Freed buffers go back to the system every this many steps.
CLEAR_CACHE_EVERY = 256


def prefill_chunks(model, inputs: mx.array, cache: list, step_size: int) -> mx.array:
    """Read `inputs` [B, W] into `cache` `step_size` positions at a time, evaluating each chunk before the
    next, and return the last chunk (1 to `step_size` positions), not read: the caller reads it with
    whatever it needs of that call (the next token's logits, a draft's proposals)."""
    while inputs.shape[1] > step_size:
        model(inputs[:, :step_size], cache=cache)
        mx.eval([c.state for c in cache])
        inputs = inputs[:, step_size:]
        mx.clear_cache()
    return inputs


def row_logprobs(
    logits: mx.array, processors: list[list[LogitsProcessor] | None], histories: list[mx.array | None]
) -> mx.array:
    """Log-probabilities [B, vocab] from `logits` [B, vocab]: row b's processors see `histories[b]` (its
    prompt and the tokens generated so far) and its own logits, then each row is normalized."""
    if any(processors):
        rows = []
        for b, row_processors in enumerate(processors):
            row = logits[b : b + 1]
            for processor in row_processors or ():
                row = processor(histories[b], row)
            rows.append(row)
        logits = mx.concatenate(rows, axis=0)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def sample(
    logits: mx.array,
    samplers: list[Sampler],
    processors: list[list[LogitsProcessor] | None],
    histories: list[mx.array | None],
) -> tuple[mx.array, mx.array]:
    """Tokens [B] and log-probabilities [B, vocab] from last-position `logits` [B, vocab], row by row.

    The log-probabilities are `row_logprobs`'; rows sharing a sampler are sampled in one call.
    """
    logprobs = row_logprobs(logits, processors, histories)
    groups: dict[int, list[int]] = {}
    for b, s in enumerate(samplers):
        groups.setdefault(id(s), []).append(b)
    if len(groups) == 1:
        return samplers[0](logprobs), logprobs
    order = [b for rows in groups.values() for b in rows]
    parts = [samplers[rows[0]](logprobs[mx.array(rows)]) for rows in groups.values()]
    inverse = mx.array(sorted(range(len(order)), key=order.__getitem__))
    return mx.concatenate(parts)[inverse], logprobs


class Rows:
    """Rows decoding together: their per-layer cache, the tokens sampled last and each row's settings.

    `y` [B] and `logprobs` [B, vocab] are the last step's results, possibly still being computed.
    """

    def __init__(self, uids, cache, samplers, processors, histories, max_tokens):
        self.uids = list(uids)
        self.cache = cache
        self.samplers = list(samplers)
        self.processors = list(processors)
        self.histories = list(histories)
        self.max_tokens = list(max_tokens)
        self.counts = [0] * len(self.uids)
        self.y = self.logprobs = None

    def __len__(self) -> int:
        return len(self.uids)

    def prefill(
        self, model, inputs: mx.array, step_size: int, sample_next: bool = True, lengths: list | None = None
    ) -> None:
        """Read `inputs` [B, W] into the cache in chunks; sample each first token.

        Prompts are left-padded, or, with `lengths` (the real tokens of each row), right-padded: each row's
        first token is then sampled after its own last token, and its pads move left in the cache.
        """
        with mx.stream(generation_stream()):
            if lengths is None:
                inputs = prefill_chunks(model, inputs, self.cache, step_size)
                logits = model(inputs, cache=self.cache, logits_to_keep=1)[:, -1, :]
            else:
                logits = self._prefill_right_padded(model, inputs, step_size, lengths)
            if not sample_next:
                mx.eval([c.state for c in self.cache])
                return
            self.y, self.logprobs = sample(logits, self.samplers, self.processors, self.histories)
        mx.async_eval(self.y, self.logprobs)

    def _prefill_right_padded(self, model, inputs: mx.array, step_size: int, lengths: list[int]) -> mx.array:
        last = [None] * len(lengths)
        for start in range(0, inputs.shape[1], step_size):
            hidden = model.model(inputs[:, start : start + step_size], cache=self.cache)
            for b, length in enumerate(lengths):
                if start < length <= start + hidden.shape[1]:
                    last[b] = hidden[b, length - 1 - start]
            mx.eval([c.state for c in self.cache], [h for h in last if h is not None])
            mx.clear_cache()
        for c in self.cache:
            c.shift_right([inputs.shape[1] - n for n in lengths])
        return model.head(mx.stack(last))

    def step(self, model) -> None:
        """Queue the next step from the tokens `y` of the last one."""
        y = self.y
        with mx.stream(generation_stream()):
            for b, row_processors in enumerate(self.processors):
                if row_processors:
                    self.histories[b] = mx.concatenate([self.histories[b], y[b : b + 1]])
            logits = model(y[:, None], cache=self.cache)[:, -1, :]
            self.y, self.logprobs = sample(logits, self.samplers, self.processors, self.histories)
        mx.async_eval(self.y, self.logprobs)

    def filter(self, keep: list[int]) -> None:
        """Keep only the rows at indices `keep`."""
        index = mx.array(keep)
        self.y, self.logprobs = self.y[index], self.logprobs[index]
        for c in self.cache:
            c.filter(keep)
        for name in ("uids", "samplers", "processors", "histories", "max_tokens", "counts"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in keep])

    def extend(self, other: Rows) -> None:
        """Append the rows of `other`; they decode with these from the next step on."""
        self.y = mx.concatenate([self.y, other.y])
        self.logprobs = mx.concatenate([self.logprobs, other.logprobs])
        for c, o in zip(self.cache, other.cache, strict=True):
            c.extend(o)
        for name in ("uids", "samplers", "processors", "histories", "max_tokens", "counts"):
            getattr(self, name).extend(getattr(other, name))
