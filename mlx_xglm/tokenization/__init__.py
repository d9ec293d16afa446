"""Tokenization: the fairseq-exact XGLM tokenizer, its config files, batch encoding, streaming decode."""

from .detokenizer import StreamingDetokenizer
from .encoding import BatchEncoding
from .tokenizer import XGLMTokenizer

__all__ = ["BatchEncoding", "StreamingDetokenizer", "XGLMTokenizer"]
