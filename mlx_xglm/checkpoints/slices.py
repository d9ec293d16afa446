"""What a rank of a sharded load reads from a checkpoint's files without reading the rest: rows of a
tensor (the vocabulary-sized tables), and a cheap fingerprint that tells checkpoints apart."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import XGLMError
from ..tokenization.tokenizer import VOCAB_FILE
from .loading import Checkpoint, weight_files
from .torch_bin import TorchTensor

SAFETENSORS_DTYPES = {
    "F32": mx.float32,
    "F16": mx.float16,
    "BF16": mx.bfloat16,
    "U32": mx.uint32,
    "I32": mx.int32,
    "U8": mx.uint8,
    "I8": mx.int8,
    "U16": mx.uint16,
    "I16": mx.int16,
    "I64": mx.int64,
}
SAMPLE_BYTES = 4096


def safetensors_header(file: Path) -> tuple[dict, int]:
    """The header of a safetensors file (name -> dtype, shape, data_offsets) and where its data begins."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def read_rows(checkpoint: Checkpoint, name: str, start: int, stop: int) -> mx.array:
    """Rows [start, stop) of the checkpoint's tensor `name` (a model parameter name), reading only them."""
    tensor = checkpoint.tensors[name]
    if isinstance(tensor, TorchTensor):
        return tensor.load(start, stop)
    for file in weight_files(checkpoint.path):
        header, data_start = safetensors_header(file)
        original = checkpoint.model.sanitize({key: key for key in header}).get(name)
        if original is None:
            continue
        entry = header[original]
        dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"]
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.size
        offset = data_start + entry["data_offsets"][0] + start * row_bytes
        if offset + (stop - start) * row_bytes > file.stat().st_size:
            raise XGLMError(f"{file}: tensor {original} is cut short; the file is incomplete, get it again")
        # Mapped, not read into memory of our own: the copy into MLX is the only one.
        data = np.memmap(file, dtype=np.uint8, mode="r", offset=offset, shape=(stop - start, row_bytes))
        return mx.array(data).view(dtype).reshape(stop - start, *shape[1:])
    raise XGLMError(f"{checkpoint.path}: tensor {name} is in no weight file")


def checkpoint_fingerprint(model_path: Path) -> str:
    """A short hash of a checkpoint folder's config, tokenizer, and each weight file's size, header and
    a few samples of its bytes: equal on every rank that reads the same checkpoint, cheap to compute."""
    digest = hashlib.sha256()
    for name in ("config.json", VOCAB_FILE):
        file = model_path / name
        digest.update(file.read_bytes() if file.is_file() else b"-")
    for file in weight_files(model_path):
        size = file.stat().st_size
        digest.update(str(size).encode())
        with open(file, "rb") as f:
            for where in (0, size // 2, max(size - SAMPLE_BYTES, 0)):
                f.seek(where)
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:32]
