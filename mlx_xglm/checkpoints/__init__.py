"""Checkpoints: Hub access, loading, the torch-free `.bin` reader, conversion, quantization, model cards,
and the tiny random-weight checkpoint for trying things offline."""

from .convert import convert
from .loading import load
from .tiny import write_tiny_checkpoint

__all__ = ["convert", "load", "write_tiny_checkpoint"]
