"""Crafted `pytorch_model.bin` files: every tensor record is checked before any memory is touched.

The files are written by hand (a zip holding `archive/data.pkl` and raw storages), without torch, so each
test can put exactly the hostile record it needs into an otherwise valid archive.
"""

import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from xglm_fixtures import hub_config, random_weights, write_tokenizer_files

from mlx_xglm import XGLMError, load
from mlx_xglm.checkpoints.torch_bin import TorchTensor, read_torch_bin


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _value(value) -> bytes:
    return pickle.dumps(value, protocol=2)[2:-1]  # without PROTO and STOP


def tensor_record(key, offset, shape, stride, kind="FloatStorage", numel=0) -> bytes:
    """The pickle opcodes torch.save writes for one tensor: _rebuild_tensor_v2(storage, offset, ...)."""
    storage = b"(" + _value("storage") + _global("torch", kind) + _value(key) + _value("cpu")
    storage += _value(numel) + b"tQ"  # TUPLE, BINPERSID
    hooks = _global("collections", "OrderedDict") + b")R"
    args = b"(" + storage + _value(offset) + _value(shape) + _value(stride) + _value(False) + hooks + b"t"
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def write_bin(path, records: dict[str, bytes], storages: dict[str, bytes]) -> None:
    pickled = b"\x80\x02}" + b"".join(_value(name) + record + b"s" for name, record in records.items())
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickled + b".")
        zf.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            zf.writestr(f"archive/data/{key}", data)


SIX_FLOATS = {"0": np.arange(6, dtype=np.float32).tobytes()}


def test_a_hand_written_file_reads_back(tmp_path):
    write_bin(tmp_path / "w.bin", {"w": tensor_record("0", 1, (2, 2), (1, 2))}, SIX_FLOATS)
    assert np.array(read_torch_bin(tmp_path / "w.bin")["w"].load()).tolist() == [[1.0, 3.0], [2.0, 4.0]]


@pytest.mark.parametrize(
    "offset, shape, stride, message",
    [
        (0, (2, 3), (-1, 1), "has offset 0, shape"),
        (-4, (2,), (1,), "has offset -4"),
        (0, (2, -3), (3, 1), "has offset 0, shape"),
        (True, (2,), (1,), "has offset True"),
        (0, (2.0,), (1,), "has offset 0, shape"),
        (0, (2, 3), (1,), "has 2 dimensions but 1 strides"),
        (5, (2,), (1,), "runs past the end of its storage 0 \\(6 elements\\)"),
        (0, (2, 4), (4, 1), "runs past the end of its storage 0"),
        (0, (4096, 4096), (0, 0), "of shape \\(4096, 4096\\) would need more bytes than the whole file"),
        (0, (1,) * 40, (1,) * 40, "has 40 dimensions"),
    ],
)
def test_a_hostile_tensor_record_is_refused_before_reading(tmp_path, offset, shape, stride, message):
    write_bin(tmp_path / "w.bin", {"w": tensor_record("0", offset, shape, stride)}, SIX_FLOATS)
    with pytest.raises(XGLMError, match=rf"w\.bin: tensor w {message}"):
        read_torch_bin(tmp_path / "w.bin")


def test_a_record_naming_a_missing_storage_is_refused(tmp_path):
    write_bin(tmp_path / "w.bin", {"w": tensor_record("7", 0, (2,), (1,))}, SIX_FLOATS)
    with pytest.raises(XGLMError, match="storage archive/data/7 is missing"):
        read_torch_bin(tmp_path / "w.bin")


@pytest.mark.parametrize("key", ["../0", "", 1.5])
def test_a_storage_key_that_is_not_a_plain_name_is_refused(tmp_path, key):
    write_bin(tmp_path / "w.bin", {"w": tensor_record(key, 0, (2,), (1,))}, SIX_FLOATS)
    with pytest.raises(XGLMError, match="storage key .* is not a plain name"):
        read_torch_bin(tmp_path / "w.bin")


def test_a_storage_with_a_partial_element_is_refused(tmp_path):
    write_bin(tmp_path / "w.bin", {"w": tensor_record("0", 0, (1,), (1,))}, {"0": b"\x00" * 6})
    with pytest.raises(XGLMError, match="partial element"):
        read_torch_bin(tmp_path / "w.bin")


def test_a_compressed_storage_cannot_expand_past_the_file(tmp_path):
    path = tmp_path / "w.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(
            "archive/data.pkl", b"\x80\x02}" + _value("w") + tensor_record("0", 0, (1,), (1,)) + b"s."
        )
        zf.writestr("archive/data/0", b"\x00" * 4_000_000, compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(XGLMError, match="expands past the file's size"):
        read_torch_bin(path)


def test_the_cli_reports_a_negative_stride_in_one_line(tmp_path, sp_model):
    """Before the checks, this record crashed the process (SIGSEGV): now it is one line and status 1."""
    folder = tmp_path / "crafted"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hub_config()))
    write_tokenizer_files(folder, sp_model)
    storage = {"0": np.zeros(64, np.float32).tobytes()}
    write_bin(
        folder / "pytorch_model.bin",
        {"model.layer_norm.weight": tensor_record("0", 63, (64,), (-1,))},
        storage,
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_xglm.cli",
            "convert",
            "--hf-path",
            folder,
            "--mlx-path",
            tmp_path / "out",
        ],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "MLX_XGLM_DEBUG"},
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "model.layer_norm.weight" in result.stderr and not (tmp_path / "out").exists()


def test_shapes_are_checked_against_the_config_before_any_tensor_is_read(tmp_path, sp_model, monkeypatch):
    folder = tmp_path / "wide"
    folder.mkdir()
    config = hub_config()
    weights = random_weights(config)
    keys = {name: str(i) for i, name in enumerate(weights)}
    records = {
        n: tensor_record(keys[n], 0, w.shape, _strides(w.shape), numel=w.size) for n, w in weights.items()
    }
    write_bin(folder / "pytorch_model.bin", records, {keys[n]: w.tobytes() for n, w in weights.items()})
    (folder / "config.json").write_text(json.dumps({**config, "d_model": 128, "attention_heads": 4}))
    write_tokenizer_files(folder, sp_model)
    reads = []
    monkeypatch.setattr(TorchTensor, "load", lambda self: reads.append(self) or pytest.fail("read"))
    with pytest.raises(XGLMError, match=r"tensor model\.\S+ has shape .*config\.json implies"):
        load(folder)
    assert reads == []


def _strides(shape) -> tuple[int, ...]:
    return tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape)))
