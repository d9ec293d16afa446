"""A chat with a base model, read into one KV cache a turn at a time.

XGLM never saw chat data. It saw documents in which every newline had been turned into `</s>`, so a
transcript like

    User: Bonjour !
    Assistant: Bonjour, comment allez-vous ?

is written for it as `</s> User: Bonjour ! </s> Assistant: Bonjour, comment allez-vous ? </s> User: ...`:
each line of the template is a "paragraph", a reply ends where the model ends its line (`</s>`), and the
next turn continues after it. Because `</s>` is a special token the tokenizer cuts the text at it, so the
ids of a turn do not depend on the turns before: the cache can keep what it has read, and each turn reads
only its own new text. `Conversation` keeps one going turn by turn (`mlx-xglm chat`); the template itself,
and `chat_prompt_ids` that writes a whole list of messages the same way (the server's chat endpoint), live
with the tokenizer's prompt code in tokenization/prompt.py.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..tokenization.prompt import DEFAULT_TEMPLATE, PLACEHOLDER, prompt_ids, split_template, user_marker
from .cache import cached_tokens, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from .generate import GenerationResponse, stream_generate
from .prefix_cache import DEFAULT_PROMPT_CACHE_SIZE, PrefixCache, common_prefix


def _encode_lines(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False, newlines="eos")


class Conversation:
    """The turns so far, and a prompt cache that holds as much of them as it can reuse.

    `template` is one turn with `{message}` where the user's text goes; its lines become `</s>`-separated
    paragraphs. `max_kv_size` bounds the cache (older positions are dropped). `reply(message)` streams the
    model's answer; the answer ends at `</s>` (the end of its line), at the next user marker (the template's
    text before `{message}`), or after `max_tokens`. A conversation that is reset leaves its cache in a
    prefix cache of `prompt_cache_size` entries and at most `prompt_cache_bytes` bytes (None: no bound;
    0 turns it off), and a new one that starts the same way reads only what differs.
    """

    def __init__(
        self,
        model,
        tokenizer,
        template: str = DEFAULT_TEMPLATE,
        max_kv_size: int | None = None,
        draft_model=None,
        prompt_cache_size: int = DEFAULT_PROMPT_CACHE_SIZE,
        prompt_cache_bytes: int | None = None,
    ):
        self.model = model
        self.draft_model = draft_model
        self.tokenizer = tokenizer
        self.template = template
        self.max_kv_size = max_kv_size
        before, after = split_template(template)
        self.user_marker = user_marker(template)
        self.user_prompt = before.rsplit("\n", 1)[-1]
        self.assistant_label = after.strip().rsplit("\n", 1)[-1]
        self.prefix_cache = None
        # With a draft model the cache list also holds the draft's layers, which may have read less.
        if prompt_cache_size != 0 and prompt_cache_bytes != 0 and draft_model is None:
            self.prefix_cache = PrefixCache(prompt_cache_size, prompt_cache_bytes)
        self.cached: list[int] = []
        self.reset()

    def reset(self) -> None:
        """Forget every turn; the next one starts a new document."""
        if self.prefix_cache is not None and self.cached:
            self.prefix_cache.insert(self.cached, self.cache)
        self.cache = self._new_cache()
        # `cached`: the ids the cache holds. `pending`: ids of the transcript it has not read yet. The first
        # turn, starting the document, gets its leading `</s>` from prompt_ids.
        self.cached: list[int] = []
        self.pending: list[int] = []

    def _new_cache(self) -> list:
        # With a draft model (speculative decoding), its layers follow the model's in one cache list.
        cache = make_prompt_cache(self.model, max_kv_size=self.max_kv_size)
        return cache + make_prompt_cache(self.draft_model) if self.draft_model is not None else cache

    @property
    def transcript_ids(self) -> list[int]:
        """All ids of the conversation so far, as one uninterrupted prompt would have them."""
        return self.cached + self.pending

    def reply(self, message: str, max_tokens: int = 256, **kwargs) -> Iterator[GenerationResponse]:
        """Stream the answer to `message` as stream_generate's responses; `kwargs` go to stream_generate.

        Close the iterator when stopping early (Ctrl-C): the transcript keeps what was generated.
        """
        turn = self.template.replace(PLACEHOLDER, message)
        ids = self.pending + prompt_ids(self.tokenizer, turn, len(self.transcript_ids), newlines="eos")
        if not self.cached and self.prefix_cache is not None:
            hit = self.prefix_cache.fetch(ids)
            if hit.cache is not None:
                self.cache, self.cached, ids = hit.cache, ids[: hit.length], ids[hit.length :]
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
            answer = _encode_lines(self.tokenizer, text)
        else:
            answer = generated
        wanted = self.cached + ids + answer + [eos]
        read = cached_tokens(self.cache)
        held = (self.cached + ids + generated)[:read]
        keep = common_prefix(held, wanted)
        if can_trim_prompt_cache(self.cache):
            trim_prompt_cache(self.cache, read - keep)
            self.cached, self.pending = wanted[:keep], wanted[keep:]
        else:
            # A rotating cache that has wrapped cannot forget its newest tokens: go on from what it holds.
            self.cached = held
            self.pending = [] if held[-1:] == [eos] else [eos]
