"""Streaming detokenizer: text out token by token, equal in the end to `tokenizer.decode`.

XGLM's pieces are whole Unicode strings ("▁" standing for a space), so no character is ever split across
tokens; what must wait is whitespace. `decode` strips the ends of the text, so leading whitespace is dropped
and trailing whitespace is held back until text follows it. Each piece is handled once: linear time.
"""

from __future__ import annotations

from .prompt import Newlines, check_newlines
from .tokenizer import SPIECE_UNDERLINE


class StreamingDetokenizer:
    """Feed ids with `add_token`, read the new text from `last_segment`, call `finalize` at the end.

    The concatenation of all segments equals `tokenizer.decode(ids, skip_special_tokens=True)`.
    With `newlines="eos"` a `</s>` reads as a line break instead: the text is then the lines between
    `</s>` tokens, each decoded on its own, joined by "\\n" (trailing line breaks dropped).
    """

    def __init__(self, tokenizer, newlines: Newlines = "space"):
        self.tokenizer = tokenizer
        self.newline_id = tokenizer.eos_token_id if check_newlines(newlines) == "eos" else None
        self.reset()

    def reset(self) -> None:
        self._segments: list[str] = []
        self._segment = ""
        self._held: list[str] = []  # whitespace (and line breaks) not yet known to be final
        self._line_started = False

    def add_token(self, token: int) -> None:
        if token == self.newline_id:
            # A new line: the previous line's trailing spaces go, the break waits for text after it.
            self._held = [ws for ws in self._held if ws == "\n"] + ["\n"]
            self._line_started = False
            return
        if token in self.tokenizer.all_special_ids:
            return
        piece = self.tokenizer.convert_id_to_token(token).replace(SPIECE_UNDERLINE, " ")
        if not self._line_started:
            piece = piece.lstrip()
            if not piece:
                return
            self._line_started = True
        body = piece.rstrip()
        if body:
            self._emit("".join(self._held) + body)
            self._held = []
        if len(body) < len(piece):
            self._held.append(piece[len(body) :])

    def _emit(self, text: str) -> None:
        self._segment += text
        self._segments.append(text)

    def finalize(self) -> None:
        """End of generation: held whitespace is dropped, as `decode` strips it."""
        self._held = []

    @property
    def last_segment(self) -> str:
        """Text that became final since the last read."""
        segment, self._segment = self._segment, ""
        return segment

    @property
    def text(self) -> str:
        return "".join(self._segments)
