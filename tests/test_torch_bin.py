"""pytorch_model.bin without torch: values, dtypes, parity with load() and convert(), hostile files."""

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import mlx.core as mx
import numpy as np
import pytest
from reference import reference_logits, reference_model
from xglm_fixtures import hub_config, random_weights, write_tokenizer_files

from mlx_xglm import XGLMError, convert, load
from mlx_xglm.checkpoints.adapters import read_adapter_weights
from mlx_xglm.checkpoints.torch_bin import read_torch_bin
from mlx_xglm.model.positions import sinusoidal_table

torch = pytest.importorskip("torch")

IDS = [[2, 10, 20, 30, 40, 50], [2, 60, 70, 80, 90, 100]]


def hub_state_dict(dtype, seed=0):
    """A state dict as the facebook/xglm-* files hold it: `model.` names, the stored sinusoid table and
    an `lm_head.weight` that is the embedding itself (one shared storage)."""
    config = hub_config()
    state = {k: torch.from_numpy(v).to(dtype) for k, v in random_weights(config, seed).items()}
    table = sinusoidal_table(config["max_position_embeddings"] + 2, config["d_model"], 1)
    state["model.embed_positions.weights"] = torch.from_numpy(table).to(dtype)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def bin_checkpoint(folder, sp_model, dtype=torch.float16, seed=0):
    folder.mkdir(parents=True)
    torch.save(hub_state_dict(dtype, seed), folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(hub_config(torch_dtype=str(dtype).split(".")[1])))
    write_tokenizer_files(folder, sp_model)
    return folder


@pytest.fixture(scope="module")
def fp16_bin(tmp_path_factory, sp_model):
    return bin_checkpoint(tmp_path_factory.mktemp("bin") / "fp16", sp_model)


def test_tensors_of_every_dtype_and_layout_read_exactly(tmp_path):
    base = torch.randn(6, 8)
    state = {
        "half": base.half(),
        "bfloat16": base.bfloat16(),
        "float": base,
        "double": base.double(),
        "long": torch.arange(7),
        "bool": base > 0,
        "slice": base[1:4, 2:7],
        "transposed": base.half().t(),
        "scalar": torch.tensor(3.5),
        "parameter": torch.nn.Parameter(base[0]),
    }
    state["shared"] = state["half"]
    torch.save(state, tmp_path / "w.bin")
    loaded = {name: tensor.load() for name, tensor in read_torch_bin(tmp_path / "w.bin").items()}
    assert loaded.keys() == state.keys()
    assert loaded["bfloat16"].dtype == mx.bfloat16 and loaded["half"].dtype == mx.float16
    for name, tensor in state.items():
        expected = tensor.detach().float().numpy() if tensor.is_floating_point() else tensor.numpy()
        got = np.array(loaded[name].astype(mx.float32) if tensor.is_floating_point() else loaded[name])
        assert got.shape == expected.shape and np.array_equal(got, expected), name


def test_tensors_are_read_only_when_asked(fp16_bin):
    tensors = read_torch_bin(fp16_bin / "pytorch_model.bin")
    embed = tensors["model.embed_tokens.weight"]
    assert embed.shape == (hub_config()["vocab_size"], 64) and embed.dtype == mx.float16
    assert embed.load().shape == embed.shape


@pytest.mark.reference
def test_load_of_a_bin_folder_matches_transformers(tmp_path, sp_model, transformers):
    folder = bin_checkpoint(tmp_path / "fp32", sp_model, dtype=torch.float32)
    model, _ = load(folder)
    expected = reference_logits(reference_model(folder), IDS)
    assert np.abs(np.array(model(mx.array(IDS))) - expected).max() < 1e-4


def test_convert_without_torch_equals_the_safetensors_result(fp16_bin, tmp_path):
    source = tmp_path / "safetensors"
    shutil.copytree(fp16_bin, source)
    (source / "pytorch_model.bin").unlink()
    state = {k: v.numpy() for k, v in hub_state_dict(torch.float16).items() if k != "lm_head.weight"}
    from safetensors.numpy import save_file

    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})
    convert(source, tmp_path / "from_safetensors", verbose=False)
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['transformers'] = None\n"
        "from mlx_xglm import convert\n"
        f"convert({str(fp16_bin)!r}, {str(tmp_path / 'from_bin')!r}, verbose=False)\n"
        "assert sys.modules['torch'] is None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    from_bin = mx.load(str(tmp_path / "from_bin" / "model.safetensors"))
    from_safetensors = mx.load(str(tmp_path / "from_safetensors" / "model.safetensors"))
    assert from_bin.keys() == from_safetensors.keys()
    assert "lm_head.weight" not in from_bin and "model.embed_positions.weights" not in from_bin
    for name, value in from_bin.items():
        assert value.dtype == mx.float16 and mx.array_equal(value, from_safetensors[name]).item(), name


def test_safetensors_is_preferred_when_both_exist(fp16_bin, tmp_path, tiny_checkpoint):
    folder = tmp_path / "both"
    shutil.copytree(fp16_bin, folder)
    shutil.copyfile(tiny_checkpoint / "model.safetensors", folder / "model.safetensors")
    both, _ = load(folder)
    tiny, _ = load(tiny_checkpoint)
    assert np.array_equal(np.array(both(mx.array(IDS))), np.array(tiny(mx.array(IDS))))


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def zip_checkpoint(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")


def test_a_pickle_that_runs_code_is_refused(tmp_path, sp_model):
    marker = tmp_path / "ran"
    folder = bin_checkpoint(tmp_path / "evil", sp_model)
    zip_checkpoint(folder / "pytorch_model.bin", pickle.dumps(RunsACommand(marker), protocol=2))
    with pytest.raises(XGLMError, match=r"^refusing to load .*pytorch_model\.bin.*(posix|os)\.system"):
        load(folder)
    with pytest.raises(XGLMError, match="refusing"):
        convert(folder, tmp_path / "out", verbose=False)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_legacy_adapter_bin_that_runs_code_is_refused_in_its_own_words(tmp_path):
    # XGLMError is a ValueError: the adapter reader's `except ValueError` must not re-word this refusal.
    marker = tmp_path / "ran"
    zip_checkpoint(tmp_path / "adapter_model.bin", pickle.dumps(RunsACommand(marker), protocol=2))
    with pytest.raises(XGLMError, match=r"^refusing to load .*adapter_model\.bin"):
        read_adapter_weights(tmp_path)
    assert not marker.exists()


def test_a_hostile_global_inside_a_state_dict_is_refused(tmp_path):
    payload = io.BytesIO()
    pickle.dump({"model.embed_tokens.weight": RunsACommand(tmp_path / "ran")}, payload, protocol=4)
    zip_checkpoint(tmp_path / "w.bin", payload.getvalue())
    with pytest.raises(XGLMError, match="not part of a plain PyTorch state dict"):
        read_torch_bin(tmp_path / "w.bin")
    assert not (tmp_path / "ran").exists()


def test_a_bare_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "w.bin").write_bytes(pickle.dumps(RunsACommand(marker), protocol=2))
    with pytest.raises(XGLMError, match="legacy"):
        read_torch_bin(tmp_path / "w.bin")
    assert not marker.exists()


def test_legacy_torch_format_is_explained(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "w.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(XGLMError, match=r"w\.bin is in PyTorch's legacy"):
        read_torch_bin(tmp_path / "w.bin")


def test_a_zip_that_is_not_a_checkpoint(tmp_path):
    with zipfile.ZipFile(tmp_path / "w.bin", "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(XGLMError, match="not a PyTorch checkpoint"):
        read_torch_bin(tmp_path / "w.bin")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_bin_is_named(fp16_bin, tmp_path, keep):
    folder = tmp_path / "cut"
    shutil.copytree(fp16_bin, folder)
    file = folder / "pytorch_model.bin"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(XGLMError, match=r"pytorch_model\.bin is truncated or corrupt"):
        load(folder)


def test_storage_shorter_than_its_tensor_is_named(fp16_bin, tmp_path):
    file = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(fp16_bin / "pytorch_model.bin") as src, zipfile.ZipFile(file, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:64] if info.filename.endswith("/data/0") else data)
    with pytest.raises(XGLMError, match=r"pytorch_model\.bin: tensor \S+ runs past the end of its storage 0"):
        read_torch_bin(file)


def test_cli_reports_a_truncated_bin_in_one_line(fp16_bin, tmp_path):
    folder = tmp_path / "cut"
    shutil.copytree(fp16_bin, folder)
    file = folder / "pytorch_model.bin"
    file.write_bytes(file.read_bytes()[:1000])
    result = subprocess.run(
        [sys.executable, "-m", "mlx_xglm.cli", "convert", "--hf-path", str(folder), "--mlx-path", "out"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "MLX_XGLM_DEBUG": ""},
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "pytorch_model.bin" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
