"""The decoding loop: generate_step, stream_generate and generate."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass

import mlx.core as mx

from ..errors import XGLMError
from ..model.token_ids import check_token_ids
from ..tokenization.detokenizer import StreamingDetokenizer
from ..tokenization.prompt import Newlines, prompt_ids
from .cache import (
    cached_tokens,
    check_kv_bits,
    check_prompt_cache,
    make_prompt_cache,
    maybe_quantize_kv_cache,
    prompt_cache_max_kv_size,
)
from .prompt_lookup import prompt_lookup_generate_step
from .rows import CLEAR_CACHE_EVERY, Rows
from .sample_utils import LogitsProcessor, Sampler, greedy
from .speculative import speculative_generate_step
from .stop_strings import StopStrings


def generate_step(
    prompt: mx.array,
    model,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    prompt_cache: list | None = None,
    prefill_step_size: int = 512,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
) -> Generator[tuple[int, mx.array], None, None]:
    """Yield `(token, logprobs)` for each new token after `prompt` (1-D ids), up to `max_tokens`.

    The prompt is read in chunks of `prefill_step_size` tokens. `prompt_cache` (from `make_prompt_cache`
    or `load_prompt_cache`) is updated in place and may already hold earlier tokens: only the new `prompt`
    is read then. Without one, a fresh cache is made, rotating when `max_kv_size` is set. `max_tokens=0`
    only reads the prompt into the cache. With `kv_bits`, the cache's keys and values are quantized
    (`kv_group_size` values per scale, as mlx-lm's) once it holds more than `quantized_kv_start` positions.
    Each step is queued before the previous token is handed out:
    this is the one-row case of the engine's `Rows` (see `BatchGenerator`).
    """
    if prompt.ndim != 1 or prompt.size == 0:
        raise XGLMError(
            f"prompt must be a non-empty 1-D array of token ids, got shape {prompt.shape}", param="prompt"
        )
    check_token_ids(prompt, model.config.vocab_size, "prompt")
    if max_tokens < 0:
        raise XGLMError(f"max_tokens must be 0 or more, got {max_tokens}", param="max_tokens")
    if prefill_step_size < 1:
        raise XGLMError(f"prefill_step_size must be >= 1, got {prefill_step_size}", param="prefill_step_size")
    if prompt_cache is None:
        prompt_cache = make_prompt_cache(model, max_kv_size)
    else:
        check_prompt_cache(model, prompt_cache)
    max_kv_size = prompt_cache_max_kv_size(prompt_cache)
    check_kv_bits(kv_bits, kv_group_size, quantized_kv_start, max_kv_size, model.config.head_dim)
    history = prompt if logits_processors else None
    rows = Rows([0], prompt_cache, [sampler or greedy], [logits_processors], [history], [max_tokens])
    rows.prefill(model, prompt[None], prefill_step_size, sample_next=max_tokens > 0)
    maybe_quantize_kv_cache(prompt_cache, quantized_kv_start, kv_group_size, kv_bits)
    for n in range(max_tokens):
        y, logprobs = rows.y, rows.logprobs
        maybe_quantize_kv_cache(prompt_cache, quantized_kv_start, kv_group_size, kv_bits)
        # Queued even after the last token, so the cache holds every token handed out.
        rows.step(model)
        yield y.item(), logprobs[0]
        if n % CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()


@dataclass
class GenerationResponse:
    """One step of `stream_generate`; field names as mlx-lm's."""

    text: str
    token: int
    logprobs: mx.array
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None
    # True for a token a draft model proposed and the model accepted (speculative decoding).
    from_draft: bool = False


class TextStream:
    """Token ids in, final text out: detokenizes, holds back text while a stop string may be forming, and
    decides when generation stops (`</s>`, a stop string, or two `</s>` in a row in newline mode).

    `stop` is strings or a `StopStrings` built once for many streams; matching is linear in the text.
    """

    def __init__(
        self, tokenizer, stop: Iterable[str] | StopStrings | None = None, newlines: Newlines = "space"
    ):
        self.detokenizer = StreamingDetokenizer(tokenizer, newlines)
        self.eos_id = tokenizer.eos_token_id
        self.newlines = newlines
        self.stop = (stop if isinstance(stop, StopStrings) else StopStrings(stop)).match()
        self._pending = ""
        self._previous = None
        self.finish_reason = None

    def add(self, token: int) -> str:
        """Text that is final after `token`; sets `finish_reason` to "stop" when generation must end."""
        ends_doc = token == self.eos_id and (self.newlines == "space" or self._previous == self.eos_id)
        self._previous = token
        if ends_doc:
            self.finish_reason = "stop"
            return self.flush()
        self.detokenizer.add_token(token)
        segment = self.detokenizer.last_segment
        start = self.stop.feed(segment)
        self._pending += segment
        if start is not None:
            self.finish_reason = "stop"
            cut = len(self._pending) - len(segment) + start
            text, self._pending = self._pending[:cut], ""
            return text
        # Hold back the end of the text that could still grow into a stop string.
        cut = len(self._pending) - self.stop.held
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return text

    def flush(self) -> str:
        """The rest of the text at the end of generation."""
        self.detokenizer.finalize()
        text = self._pending + self.detokenizer.last_segment
        self._pending = ""
        return text


def _prompt_ids(model, tokenizer, prompt, prompt_cache, newlines: Newlines) -> mx.array:
    if not isinstance(prompt, mx.array):
        cached = 0 if prompt_cache is None else cached_tokens(prompt_cache)
        prompt = mx.array(prompt_ids(tokenizer, prompt, cached, newlines))
    # Checked here too, as the speculative loop does not pass through generate_step.
    return check_token_ids(prompt, model.config.vocab_size, "prompt")


def stream_generate(
    model,
    tokenizer,
    prompt: str | list[int] | mx.array,
    max_tokens: int = 256,
    *,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    prompt_cache: list | None = None,
    stop: str | list[str] | None = None,
    newlines: Newlines = "space",
    draft_model=None,
    num_draft_tokens: int = 3,
    prompt_lookup_num_tokens: int | None = None,
    max_matching_ngram_size: int = 2,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """Yield a `GenerationResponse` per generated token.

    `prompt` is text, a list of ids or an `mx.array`. Generation ends at `</s>` or at any of the `stop`
    strings (which are not part of the text), with `finish_reason` "stop", or after `max_tokens` with
    "length". `newlines="eos"` encodes "\\n" in a text prompt as `</s>`, shows a generated `</s>` as "\\n"
    and ends on two in a row. With a `draft_model` (same tokenizer), decoding is speculative: the draft
    proposes `num_draft_tokens` tokens at a time (`from_draft` marks those accepted) and `prompt_cache`, if
    given, is `make_prompt_cache(model) + make_prompt_cache(draft_model)`. With `prompt_lookup_num_tokens`
    (as transformers' `generate`), the proposals are instead copied from earlier matches of the last
    `max_matching_ngram_size` tokens (prompt-lookup decoding, see prompt_lookup.py). Other keyword
    arguments (`prefill_step_size`, `max_kv_size`, `kv_bits`, `kv_group_size`, `quantized_kv_start`) go to
    `generate_step`.
    """
    ids = _prompt_ids(model, tokenizer, prompt, prompt_cache, newlines)
    stream = TextStream(tokenizer, stop, newlines)
    tic = time.perf_counter()
    options = {"max_tokens": max_tokens, "sampler": sampler, "logits_processors": logits_processors}
    if draft_model is not None and prompt_lookup_num_tokens is not None:
        raise XGLMError(
            "give a draft model or prompt_lookup_num_tokens, not both", param="prompt_lookup_num_tokens"
        )
    if prompt_lookup_num_tokens is not None:
        if kwargs.pop("max_kv_size", None) is not None:
            raise XGLMError(
                "prompt-lookup decoding takes back rejected tokens, which a rotating cache cannot always do; "
                "drop max_kv_size or prompt_lookup_num_tokens",
                param="max_kv_size",
            )
        steps = prompt_lookup_generate_step(
            ids,
            model,
            prompt_lookup_num_tokens=prompt_lookup_num_tokens,
            max_matching_ngram_size=max_matching_ngram_size,
            prompt_cache=prompt_cache,
            **options,
            **kwargs,
        )
    elif draft_model is None:
        steps = (
            (token, logprobs, False)
            for token, logprobs in generate_step(ids, model, prompt_cache=prompt_cache, **options, **kwargs)
        )
    else:
        if kwargs.get("max_kv_size") is not None:
            raise XGLMError(
                "speculative decoding takes back rejected tokens, which a rotating cache cannot always do; "
                "drop max_kv_size or the draft model",
                param="max_kv_size",
            )
        kwargs.pop("max_kv_size", None)
        kv_bits = kwargs.pop("kv_bits", None)
        kwargs.pop("kv_group_size", None)
        kwargs.pop("quantized_kv_start", None)
        if kv_bits is not None:
            raise XGLMError(
                "speculative decoding with a draft model keeps float caches; drop kv_bits", param="kv_bits"
            )
        steps = speculative_generate_step(
            ids,
            model,
            draft_model,
            num_draft_tokens=num_draft_tokens,
            prompt_cache=prompt_cache,
            **options,
            **kwargs,
        )
    prompt_tps = 0.0
    for n, (token, logprobs, from_draft) in enumerate(steps):
        if n == 0:
            prompt_time = time.perf_counter() - tic
            prompt_tps = ids.size / prompt_time
            tic = time.perf_counter()
        text = stream.add(token)
        if stream.finish_reason is None and n + 1 == max_tokens:
            stream.finish_reason = "length"
            text += stream.flush()
        yield GenerationResponse(
            text=text,
            token=token,
            logprobs=logprobs,
            prompt_tokens=ids.size,
            prompt_tps=prompt_tps,
            generation_tokens=n + 1,
            generation_tps=(n + 1) / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=stream.finish_reason,
            from_draft=from_draft,
        )
        if stream.finish_reason is not None:
            break


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """The generated text for `prompt`; `verbose` streams it to stdout and prints mlx-lm's footer.

    Keyword arguments are those of `stream_generate`.
    """
    if verbose:
        print("=" * 10)
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose:
        print()
        print("=" * 10)
        if response is None:
            print("No text generated for this prompt")
            return text
        print_stats(
            response.prompt_tokens,
            response.prompt_tps,
            response.generation_tokens,
            response.generation_tps,
            response.peak_memory,
        )
    return text


def stats_lines(prompt_tokens, prompt_tps, generation_tokens, generation_tps, peak_memory) -> list[str]:
    """The lines of mlx-lm's stats footer, which users and scripts parse."""
    return [
        f"Prompt: {prompt_tokens} tokens, {prompt_tps:.3f} tokens-per-sec",
        f"Generation: {generation_tokens} tokens, {generation_tps:.3f} tokens-per-sec",
        f"Peak memory: {peak_memory:.3f} GB",
    ]


def print_stats(prompt_tokens, prompt_tps, generation_tokens, generation_tps, peak_memory) -> None:
    """Print mlx-lm's stats footer."""
    print("\n".join(stats_lines(prompt_tokens, prompt_tps, generation_tokens, generation_tps, peak_memory)))
