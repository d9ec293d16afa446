"""Tokenization: the fairseq-exact XGLM tokenizer, its config files, batch encoding, streaming decode."""

from .detokenizer import StreamingDetokenizer
from .encoding import BatchEncoding
from .prompt import NEWLINES, Newlines, check_newlines, prompt_ids
from .tokenizer import XGLMTokenizer

__all__ = [
    "NEWLINES",
    "BatchEncoding",
    "Newlines",
    "StreamingDetokenizer",
    "XGLMTokenizer",
    "check_newlines",
    "prompt_ids",
]
