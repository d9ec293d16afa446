"""Reading prompts from requests: text or token ids, chat messages, and the limits they must keep."""

from __future__ import annotations

from ..tokenization import prompt_ids
from ..tokenization.prompt import chat_prompt_ids
from .errors import APIError
from .protocol import ChatMessage


def check_ids(ids: list[int], vocab_size: int, max_prompt_tokens: int, param: str = "prompt") -> list[int]:
    """`ids` if they are a usable prompt: not empty, inside the vocabulary (400), not too long (413)."""
    if not ids:
        raise APIError(400, f"{param} is empty; give at least one token or some text", param)
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise APIError(
            400, f"{param} holds token id {bad}, outside the vocabulary (0 to {vocab_size - 1})", param
        )
    if len(ids) > max_prompt_tokens:
        raise APIError(
            413,
            f"{param} is {len(ids)} tokens long; this server takes at most {max_prompt_tokens}",
            param,
            "prompt_too_long",
        )
    return ids


def prompt_list(prompt) -> list:
    """The prompts of a completions `prompt` (a string, strings, a list of ids, or lists of ids), as a
    list of strings and id lists; cheap, so that the number of rows can be checked before any work."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is an empty list; give text, token ids, or lists of either", "prompt")
    return [prompt] if isinstance(prompt[0], int) else list(prompt)


def completion_prompts(prompts: list, tokenizer, vocab_size: int, max_prompt_tokens: int) -> list[list[int]]:
    """The id lists of `prompt_list`'s prompts. Text gets the leading `</s>` every XGLM document starts
    with; a token-id prompt is used as given. Tokenizing is CPU work: call it off the event loop."""
    return [check_ids(prompt_ids(tokenizer, p), vocab_size, max_prompt_tokens) for p in prompts]


def token_budget(max_tokens: int | None, default: int, prompts: list[list[int]], context: int) -> int:
    """The tokens each row may generate: `max_tokens`, or `default` cut to the room the context has left
    after the longest prompt. Asking for more than that room is a 400, as OpenAI and vLLM answer."""
    longest = max(len(ids) for ids in prompts)
    room = context - longest
    if max_tokens is None:
        if room >= 1:
            return min(default, room)
        max_tokens = 1
    if max_tokens > room:
        raise APIError(
            400,
            f"this model's context is {context} tokens; the prompt takes {longest}, which leaves "
            f"{max(room, 0)} for max_tokens, and {max_tokens} were asked for; ask for fewer",
            "max_tokens",
            "context_length_exceeded",
        )
    return max_tokens


def chat_prompt(
    messages: list[ChatMessage], tokenizer, template: str, vocab_size: int, max_prompt_tokens: int
) -> list[int]:
    """The transcript ids of chat `messages`, written as `mlx-xglm chat` writes its turns."""
    ids = chat_prompt_ids(tokenizer, [(m.role, m.text) for m in messages], template)
    return check_ids(ids, vocab_size, max_prompt_tokens, "messages")
