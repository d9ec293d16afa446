"""How text becomes a prompt: the two ways to treat a newline, when a prompt gets its leading `</s>`, and
the chat template that writes a transcript of messages as one document.

XGLM saw its training documents with every newline turned into `</s>`, and each document starting with
`</s>` (fairseq's convention). `newlines` picks between transformers' behaviour ("space": sentencepiece
reads a newline as a space) and the training one ("eos"). A chat transcript is written the training way:
each line of the template is a paragraph, and a reply ends where the model ends its line (`</s>`); see
decoding/chat.py for a conversation kept going in one KV cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

from ..errors import XGLMError

Newlines = Literal["space", "eos"]
NEWLINES: tuple[str, ...] = get_args(Newlines)
# One user turn of a chat, the user's text in place of PLACEHOLDER; it ends with the assistant's label.
DEFAULT_TEMPLATE = "User: {message}\nAssistant:"
PLACEHOLDER = "{message}"


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


def split_template(template: str) -> tuple[str, str]:
    """The template's text before and after `{message}`; an XGLMError unless it has exactly one."""
    if template.count(PLACEHOLDER) != 1:
        raise XGLMError(
            f"template must contain {PLACEHOLDER} exactly once, got {template!r}", param="template"
        )
    before, after = template.split(PLACEHOLDER)
    return before, after


def user_marker(template: str) -> str:
    """The text a user turn starts with (the template before `{message}`, stripped): where a reply ends."""
    return split_template(template)[0].strip()


def chat_prompt_ids(
    tokenizer, messages: Iterable[tuple[str, str]], template: str = DEFAULT_TEMPLATE
) -> list[int]:
    """The ids of a transcript of `(role, content)` messages, ready for the next reply.

    As `Conversation` writes it: the document's `</s>`, then a "user" message as `template` with its
    content in place of `{message}` (the template ends with the assistant's label, so the model answers
    next); an "assistant" message as its content ending its line (`</s>`); a "system" message as a line of
    its own. Newlines inside any content become `</s>`.
    """
    split_template(template)
    ids: list[int] = []
    for role, content in messages:
        if role == "user":
            text = template.replace(PLACEHOLDER, content)
        elif role in ("assistant", "system"):
            text = content
        else:
            raise XGLMError(f"unknown chat role {role!r}; use 'system', 'user' or 'assistant'", param="role")
        # The first message starts the document and gets its leading </s> from the one policy.
        ids += prompt_ids(tokenizer, text, len(ids), newlines="eos")
        if role != "user":
            ids.append(tokenizer.eos_token_id)
    return ids
