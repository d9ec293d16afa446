"""Tokenization: the fairseq-exact XGLM tokenizer, its config files, batch encoding, prompts
and chat templates, streaming decode."""

from .detokenizer import StreamingDetokenizer
from .encoding import BatchEncoding
from .prompt import (
    DEFAULT_TEMPLATE,
    NEWLINES,
    Newlines,
    chat_prompt_ids,
    check_newlines,
    prompt_ids,
    split_template,
    user_marker,
)
from .tokenizer import XGLMTokenizer

__all__ = [
    "DEFAULT_TEMPLATE",
    "NEWLINES",
    "BatchEncoding",
    "Newlines",
    "StreamingDetokenizer",
    "XGLMTokenizer",
    "chat_prompt_ids",
    "check_newlines",
    "prompt_ids",
    "split_template",
    "user_marker",
]
