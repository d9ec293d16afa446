"""Reading PyTorch `pytorch_model.bin` checkpoints without torch, and without letting a pickle run code.

torch.save writes a zip archive: `<name>/data.pkl` pickles the state dict, and each tensor storage is a raw
little-endian file `<name>/data/<key>`. The pickle refers to storages by key and rebuilds tensors through
`torch._utils._rebuild_tensor_v2`. We unpickle with a `find_class` that admits only those rebuild functions,
the storage types and OrderedDict, so a hostile pickle (one that names `os.system`, say) is refused before
anything of it runs. Every tensor record (storage, offset, shape, strides) is checked against its storage
and the file's size before any data is touched; tensors are then read one at a time, when asked for, from
a memory map of the file.
"""

from __future__ import annotations

import math
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import XGLMError

# torch storage class -> numpy dtype of its elements; bfloat16 is read as its raw 16 bits.
STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}
MAX_DIMS = 32


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _Storage:
    kind: str
    key: str


@dataclass
class TorchTensor:
    """One tensor of a `.bin` checkpoint, not yet read: `shape`, `dtype` and `load()`."""

    archive: _Archive
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> mx.Dtype:
        if self.storage.kind == "BFloat16Storage":
            return mx.bfloat16
        return mx.array(np.zeros(0, STORAGE_DTYPES[self.storage.kind])).dtype

    def check(self, name: str) -> None:
        """Raise XGLMError unless this record describes a tensor inside its storage; reads no tensor data.

        Offsets and strides must be non-negative integers, the last element must lie inside the storage,
        and the tensor's bytes cannot exceed the file's size (an expanded view of a few stored values
        could otherwise ask for any amount of memory).
        """

        def bad(what: str) -> XGLMError:
            path = self.archive.path
            return XGLMError(f"{path}: tensor {name} {what}; the file is corrupt or crafted, get it again")

        if not all(_is_index(v) for v in (self.offset, *self.shape, *self.stride)):
            raise bad(f"has offset {self.offset!r}, shape {self.shape!r} and strides {self.stride!r}")
        if len(self.shape) != len(self.stride) or len(self.shape) > MAX_DIMS:
            raise bad(f"has {len(self.shape)} dimensions but {len(self.stride)} strides")
        itemsize = np.dtype(STORAGE_DTYPES[self.storage.kind]).itemsize
        if math.prod(self.shape) * itemsize > self.archive.size:
            raise bad(f"of shape {self.shape} would need more bytes than the whole file holds")
        elements = self.archive.storage_elements(self.storage)
        if self.offset + _extent(self.shape, self.stride) > elements:
            raise bad(f"runs past the end of its storage {self.storage.key} ({elements} elements)")

    def load(self, start: int = 0, stop: int | None = None) -> mx.array:
        """The tensor's values as an mx.array (reads its storage from the archive); `check` comes first.

        `start` and `stop` keep only those rows (first axis): a stored member is mapped, not copied, so
        only their bytes are read.
        """
        data = self.archive.read_storage(self.storage)
        itemsize = data.itemsize
        shape, offset = self.shape, self.offset
        if shape:
            stop = shape[0] if stop is None else stop
            shape, offset = (stop - start, *shape[1:]), offset + start * self.stride[0]
        view = np.lib.stride_tricks.as_strided(
            data[offset:], shape, [s * itemsize for s in self.stride], writeable=False
        )
        array = mx.array(view if view.flags.c_contiguous else view.copy())
        return array.view(mx.bfloat16) if self.storage.kind == "BFloat16Storage" else array


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _extent(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    if any(n == 0 for n in shape):
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))


class _Archive:
    def __init__(self, path: Path, zf: zipfile.ZipFile, prefix: str):
        self.path = path
        self.zf = zf
        self.prefix = prefix
        byteorder = f"{prefix}/byteorder"
        self.big_endian = byteorder in zf.namelist() and zf.read(byteorder).strip() == b"big"
        self.size = path.stat().st_size

    def _info(self, storage: _Storage) -> zipfile.ZipInfo:
        name = f"{self.prefix}/data/{storage.key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise XGLMError(f"{self.path}: storage {name} is missing from the archive") from None
        if info.file_size % np.dtype(STORAGE_DTYPES[storage.kind]).itemsize:
            raise XGLMError(f"{self.path}: storage {name} has a partial element; the file is corrupt")
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > self.size:
            raise XGLMError(f"{self.path}: compressed storage {name} expands past the file's size")
        return info

    def storage_elements(self, storage: _Storage) -> int:
        """How many elements `storage` holds, from the archive's directory (no data is read)."""
        return self._info(storage).file_size // np.dtype(STORAGE_DTYPES[storage.kind]).itemsize

    def read_storage(self, storage: _Storage) -> np.ndarray:
        info = self._info(storage)
        name = info.filename
        dtype = np.dtype(STORAGE_DTYPES[storage.kind])
        if self.big_endian:
            dtype = dtype.newbyteorder(">")
        try:
            if info.compress_type == zipfile.ZIP_STORED:
                data = self._map(info, dtype)
            else:
                data = np.frombuffer(self.zf.read(name), dtype)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise XGLMError(f"{self.path} is corrupt: cannot read {name} ({e})") from None
        return data.astype(dtype.newbyteorder("="), copy=False)

    def _map(self, info: zipfile.ZipInfo, dtype: np.dtype) -> np.ndarray:
        """Map a stored (uncompressed) member, as torch writes them, instead of copying it into memory."""
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            header = f.read(30)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"bad local header for {info.filename}")
        # The local header's own name and extra lengths: torch pads the extra field to align storages.
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > self.path.stat().st_size:
            raise zipfile.BadZipFile(f"{info.filename} runs past the end of the file")
        count = info.file_size // dtype.itemsize
        return (
            np.memmap(self.path, dtype, mode="r", offset=start, shape=(count,))
            if count
            else np.zeros(0, dtype)
        )


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits the handful of globals a state dict needs; anything else is a security error."""

    def __init__(self, file, archive: _Archive):
        super().__init__(file)
        self.archive = archive

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise XGLMError(
            f"refusing to load {self.archive.path}: its pickle asks for {module}.{name}, which is not part "
            "of a plain PyTorch state dict (a pickle can run code; this file may be malicious)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise XGLMError(f"{self.archive.path}: unknown persistent reference {pid!r} in data.pkl")
        _, storage_type, key, _location, _numel = pid
        if not isinstance(storage_type, _StorageType) or storage_type.name not in STORAGE_DTYPES:
            raise XGLMError(f"{self.archive.path}: unsupported storage type {storage_type!r}")
        if not isinstance(key, (str, int)) or not re.fullmatch(r"\w+", str(key)):
            raise XGLMError(f"{self.archive.path}: storage key {key!r} is not a plain name")
        return _Storage(storage_type.name, str(key))

    def _rebuild_tensor(self, storage, offset, shape, stride, *_ignored) -> TorchTensor:
        if not isinstance(storage, _Storage):
            raise XGLMError(f"{self.archive.path}: a tensor is rebuilt from something that is not a storage")
        if not all(isinstance(v, (tuple, list)) for v in (shape, stride)):
            raise XGLMError(f"{self.archive.path}: a tensor's shape or strides are not lists of integers")
        return TorchTensor(self.archive, storage, offset, tuple(shape), tuple(stride))


def _rebuild_parameter(data, _requires_grad, _backward_hooks, *_ignored):
    return data


def _pickle_name(path: Path, zf: zipfile.ZipFile) -> str:
    names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(names) != 1:
        raise XGLMError(f"{path} is a zip archive but not a PyTorch checkpoint (no <name>/data.pkl)")
    return names[0]


def read_torch_bin(path: str | Path) -> dict[str, TorchTensor]:
    """The tensors of a `pytorch_model.bin`, by name, each read from disk only when `.load()` is called.

    Raises XGLMError for files that are not PyTorch zip checkpoints (including the legacy pre-1.6 format),
    for truncated or corrupt archives, and for pickles that ask for anything beyond plain tensors.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise XGLMError(f"cannot read {path}: {e}") from None
    if not zipfile.is_zipfile(path):
        if head[:1] == b"\x80":
            raise XGLMError(
                f"{path} is in PyTorch's legacy (pre-1.6, non-zip) format, which is not supported; "
                "re-save it with a recent torch (torch.save(torch.load(f), f)) or use a safetensors copy"
            )
        kind = "truncated or corrupt" if head.startswith(b"PK") else "not a PyTorch checkpoint"
        raise XGLMError(f"{path} is {kind}; download it again")
    try:
        zf = zipfile.ZipFile(path)
        pkl = _pickle_name(path, zf)
        archive = _Archive(path, zf, pkl.split("/")[0])
        with zf.open(pkl) as f:
            state = _RestrictedUnpickler(f, archive).load()
    except XGLMError:  # a ValueError, but one that already says what is wrong
        raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as e:
        raise XGLMError(f"{path} is truncated or corrupt ({e}); download it again") from None
    if not isinstance(state, dict) or not all(isinstance(v, TorchTensor) for v in state.values()):
        raise XGLMError(f"{path} does not hold a state dict of tensors")
    for name, tensor in state.items():
        tensor.check(name)
    return dict(state)
