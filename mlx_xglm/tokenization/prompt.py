"""How text becomes a prompt: the two ways to treat a newline, and when a prompt gets its leading `</s>`.

XGLM saw its training documents with every newline turned into `</s>`, and each document starting with
`</s>` (fairseq's convention). `newlines` picks between transformers' behaviour ("space": sentencepiece
reads a newline as a space) and the training one ("eos").
"""

from __future__ import annotations

from typing import Literal, get_args

from ..errors import XGLMError

Newlines = Literal["space", "eos"]
NEWLINES: tuple[str, ...] = get_args(Newlines)


def check_newlines(newlines: str) -> Newlines:
    """`newlines` itself when it is "space" or "eos"; otherwise an XGLMError naming the parameter."""
    if newlines not in NEWLINES:
        raise XGLMError(f"newlines must be 'space' or 'eos', got {newlines!r}", param="newlines")
    return newlines


def prompt_ids(
    tokenizer, prompt: str | list[int], cached_tokens: int = 0, newlines: Newlines = "space"
) -> list[int]:
    """The ids to feed the model for `prompt`, after `cached_tokens` tokens already in its KV cache.

    A text starts with `</s>` only when it starts a document (`cached_tokens == 0`): a continuation of a
    cached prompt must not get a second one in the middle. Ids (a list) are used as given. `newlines` is
    "space" or "eos" (see the module docstring).
    """
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=cached_tokens == 0, newlines=newlines)
    return list(prompt)
