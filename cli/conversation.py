"""A chat transcript for a base model, read into one KV cache a turn at a time.

XGLM never saw chat data. It saw documents in which every newline had been turned into `</s>`, so a
transcript like

    User: Bonjour !
    Assistant: Bonjour, comment allez-vous ?

is written for it as `</s> User: Bonjour ! </s> Assistant: Bonjour, comment allez-vous ? </s> User: ...`:
each line of the template is a "paragraph", a reply ends where the model ends its line (`</s>`), and the
next turn continues after it. Because `</s>` is a special token the tokenizer cuts the text at it, so the
ids of a turn do not depend on the turns before: the cache can keep what it has read, and each turn reads
only its own new text.
"""

from __future__ import annotations

from collections.abc import Iterator

from mlx_xglm import XGLMError, make_prompt_cache, stream_generate
from mlx_xglm.decoding.generate import GenerationResponse

DEFAULT_TEMPLATE = "User: {message}\nAssistant:"
PLACEHOLDER = "{message}"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def split_template(template: str) -> tuple[str, str]:
    """The template's text before and after `{message}`; an XGLMError unless it has exactly one."""
    if template.count(PLACEHOLDER) != 1:
        raise XGLMError(f"--template must contain {PLACEHOLDER} exactly once, got {template!r}")
    before, after = template.split(PLACEHOLDER)
    return before, after


class Conversation:
    """The turns so far, and a prompt cache that holds as much of them as it can reuse.

    `template` is one turn with `{message}` where the user's text goes; its lines become `</s>`-separated
    paragraphs. `max_kv_size` bounds the cache (older positions are dropped). `reply(message)` streams the
    model's answer; the answer ends at `</s>` (the end of its line), at the next user marker (the template's
    text before `{message}`), or after `max_tokens`.
    """

    def __init__(
        self,
        model,
        tokenizer,
        template: str = DEFAULT_TEMPLATE,
        max_kv_size: int | None = None,
        draft_model=None,
    ):
        self.model = model
        self.draft_model = draft_model
        self.tokenizer = tokenizer
        self.template = template
        self.max_kv_size = max_kv_size
        before, after = split_template(template)
        self.user_marker = before.strip()
        self.user_prompt = before.rsplit("\n", 1)[-1]
        self.assistant_label = after.strip().rsplit("\n", 1)[-1]
        self.reset()

    def reset(self) -> None:
        """Forget every turn; the next one starts a new document."""
        self.cache = self._new_cache()
        # `cached`: the ids the cache holds. `pending`: ids of the transcript it has not read yet, starting
        # with the `</s>` every XGLM document begins with.
        self.cached: list[int] = []
        self.pending: list[int] = [self.tokenizer.eos_token_id]

    def _new_cache(self) -> list:
        # With a draft model (speculative decoding), its layers follow the model's in one cache list.
        cache = make_prompt_cache(self.model, max_kv_size=self.max_kv_size)
        return cache + make_prompt_cache(self.draft_model) if self.draft_model is not None else cache

    @property
    def transcript_ids(self) -> list[int]:
        """All ids of the conversation so far, as one uninterrupted prompt would have them."""
        return self.cached + self.pending

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False, newlines="eos")

    def reply(self, message: str, max_tokens: int = 256, **kwargs) -> Iterator[GenerationResponse]:
        """Stream the answer to `message` as stream_generate's responses; `kwargs` go to stream_generate.

        Close the iterator when stopping early (Ctrl-C): the transcript keeps what was generated.
        """
        ids = self.pending + self._encode(self.template.replace(PLACEHOLDER, message))
        stop = [self.user_marker] if self.user_marker else None
        generated: list[int] = []
        text: list[str] = []
        finish = None
        responses = stream_generate(
            self.model, self.tokenizer, ids, max_tokens, prompt_cache=self.cache, stop=stop, **kwargs
        )
        try:
            for response in responses:
                generated.append(response.token)
                text.append(response.text)
                finish = response.finish_reason
                yield response
        except GeneratorExit:
            # Closed between tokens: the cache is whole and holds what was generated so far.
            responses.close()
            self._settle(ids, generated, "".join(text), "interrupted")
            raise
        except BaseException:
            # Stopped in the middle of a step, the cache may be half-written: read it all again next turn.
            self.pending = self.cached + ids + generated + [self.tokenizer.eos_token_id]
            self.cached = []
            self.cache = self._new_cache()
            raise
        self._settle(ids, generated, "".join(text), finish)

    def _settle(self, ids: list[int], generated: list[int], text: str, finish: str | None) -> None:
        """Line the cache up with the transcript: keep the ids both agree on, queue the rest for next turn."""
        eos = self.tokenizer.eos_token_id
        if generated and generated[-1] == eos:
            answer = generated[:-1]
        elif finish == "stop":
            # Stopped at the user marker: the marker's tokens are not part of the answer.
            answer = self._encode(text)
        else:
            answer = generated
        wanted = self.cached + ids + answer + [eos]
        read = self.cache[0].offset
        held = (self.cached + ids + generated)[:read]
        keep = _common_prefix(held, wanted)
        if all(layer.is_trimmable() for layer in self.cache):
            for layer in self.cache:
                layer.trim(read - keep)
            self.cached, self.pending = wanted[:keep], wanted[keep:]
        else:
            # A rotating cache that has wrapped cannot forget its newest tokens: go on from what it holds.
            self.cached = held
            self.pending = [] if held[-1:] == [eos] else [eos]
