"""One choice of a response: its text (streaming detokenizer and stop strings), tokens and log-probabilities.

Text offsets count characters of the text the choice returns: with `echo` that text starts with the prompt
as its tokens decode, and the answer follows it without losing the space between them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..decoding.generate import TextStream
from ..decoding.stop_strings import StopStrings
from ..tokenization.tokenizer import SPIECE_UNDERLINE
from .jobs import Token

# JSON has no NaN or infinity: a log-probability below this is sent as this (vLLM sends -9999.0 too).
LOWEST_LOGPROB = -9999.0


def _finite(logprob: float | None) -> float | None:
    if logprob is None:
        return None
    return logprob if logprob >= LOWEST_LOGPROB else LOWEST_LOGPROB  # NaN compares false: floored too


def _finite_top(top: list[tuple[int, float]] | None) -> list[tuple[int, float]] | None:
    return None if top is None else [(token, _finite(lp)) for token, lp in top]


@dataclass
class Entry:
    """A token of the choice: id, log-probability (None for a prompt's first token), top alternatives."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None
    offset: int


def token_text(tokenizer, token: int) -> str:
    """The text of one token as the API shows it: pieces with their spaces, specials by name."""
    if token in tokenizer.all_special_ids:
        return tokenizer.ids_to_special_tokens[token]
    return tokenizer.convert_id_to_token(token).replace(SPIECE_UNDERLINE, " ")


class Choice:
    """Collects the tokens of one row; `add` returns the text that became final with each."""

    def __init__(self, tokenizer, index: int, stop: StopStrings | list[str], newlines: str = "space"):
        self.index = index
        self.stream = TextStream(tokenizer, stop, newlines)
        self.text = ""
        self.entries: list[Entry] = []
        self.generated = 0
        self.finish_reason: str | None = None
        self._sent = 0

    def echo(self, prompt: list[int], scores: list | None) -> str:
        """Start the text with the prompt's; `scores` (from `prompt_logprobs`) fill its log-probabilities."""
        detokenizer = self.stream.detokenizer
        for i, token in enumerate(prompt):
            logprob, top = scores[i - 1] if (scores and i) else (None, None)
            self.entries.append(Entry(token, _finite(logprob), _finite_top(top), len(self.text)))
            detokenizer.add_token(token)
            self.text += detokenizer.last_segment
        return self.text

    def add(self, event: Token) -> str:
        """Take one event from the engine; returns the new final text (sets `finish_reason` at the end)."""
        if self.finish_reason is not None:
            return ""
        text = ""
        if event.token is not None:
            self.generated += 1
            entry = Entry(event.token, _finite(event.logprob), _finite_top(event.top), len(self.text))
            self.entries.append(entry)
            text = self.stream.add(event.token)
        if self.stream.finish_reason is not None:
            self.finish_reason = self.stream.finish_reason
        elif event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            text += self.stream.flush()
        self.text += text
        return text

    def new_entries(self) -> list[Entry]:
        """The entries not handed out yet (for a streamed chunk)."""
        entries, self._sent = self.entries[self._sent :], len(self.entries)
        return entries


def completion_logprobs(tokenizer, entries: list[Entry]) -> dict:
    """The `logprobs` object of a legacy completion choice."""
    tops = []
    for entry in entries:
        if entry.logprob is None:
            tops.append(None)
            continue
        top = {token_text(tokenizer, t): lp for t, lp in entry.top or []}
        top.setdefault(token_text(tokenizer, entry.token), entry.logprob)
        tops.append(top)
    return {
        "tokens": [token_text(tokenizer, e.token) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": tops,
        "text_offset": [e.offset for e in entries],
    }


def _chat_token(tokenizer, token: int, logprob: float) -> dict:
    text = token_text(tokenizer, token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(tokenizer, entries: list[Entry]) -> dict:
    """The `logprobs` object of a chat choice: `content`, one item per token with its `top_logprobs`."""
    content = []
    for entry in entries:
        item = _chat_token(tokenizer, entry.token, entry.logprob)
        item["top_logprobs"] = [_chat_token(tokenizer, t, lp) for t, lp in entry.top or []]
        content.append(item)
    return {"content": content}
