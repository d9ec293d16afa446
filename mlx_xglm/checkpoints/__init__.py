"""Checkpoints: Hub access, loading, the torch-free `.bin` reader, conversion, quantization, model cards."""

from .convert import convert
from .loading import DTYPES, Checkpoint, load, open_checkpoint
from .quantize import quantize_model

__all__ = ["DTYPES", "Checkpoint", "convert", "load", "open_checkpoint", "quantize_model"]
