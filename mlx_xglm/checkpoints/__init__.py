"""Checkpoints: Hub access, loading, the torch-free `.bin` reader, conversion, quantization, model cards."""

from .convert import convert
from .loading import load

__all__ = ["convert", "load"]
