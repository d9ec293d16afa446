"""Checkpoints: Hub access, loading, the torch-free `.bin` reader, conversion, quantization, model cards,
and the tiny random-weight checkpoint for trying things offline."""

from .convert import convert
from .loading import DTYPES, Checkpoint, load, open_checkpoint
from .quantize import quantize_model
from .sharded import sharded_load
from .tiny import write_tiny_checkpoint

__all__ = [
    "DTYPES",
    "Checkpoint",
    "convert",
    "load",
    "open_checkpoint",
    "quantize_model",
    "sharded_load",
    "write_tiny_checkpoint",
]
