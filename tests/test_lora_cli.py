"""`mlx-xglm lora`, `mlx-xglm fuse` and `--adapter-path`, run as a user would: in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from lora_fixtures import data_folder
from xglm_fixtures import child_process, read_within

from mlx_xglm import generate, load

CLI = [sys.executable, "-m", "mlx_xglm.cli"]


@pytest.fixture
def mlx_xglm(tmp_path):
    drop = ("MLX_XGLM_DEBUG", "NO_COLOR", "FORCE_COLOR", "HF_HUB_CACHE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")

    def run(*args) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
        )

    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def cli_adapter(tiny_checkpoint, data, tmp_path_factory):
    """An adapter trained by the command (module-wide, so later tests reuse it)."""
    out = tmp_path_factory.mktemp("cli") / "adapters"
    args = ["lora", "--model", tiny_checkpoint, "--train", "--data", data, "--iters", 12]
    args += ["--steps-per-report", 4, "--steps-per-eval", 6, "--save-every", 5, "--learning-rate", 1e-2]
    args += ["--adapter-path", out, "--num-layers", 1, "--target-modules", "q_proj,fc2", "--test"]
    result = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_lora_trains_reports_and_saves(cli_adapter):
    out, stdout = cli_adapter
    assert stdout.startswith("Trainable parameters: ")
    for line in ("Iter 0: Val loss ", "Iter 4: Train loss ", "Iter 6: Val loss ", "Iter 12: Val loss "):
        assert line in stdout
    assert "Tokens/sec " in stdout and "Peak mem " in stdout and "Learning Rate 1.000e-02" in stdout
    assert stdout.count("Saved adapter weights") == 3  # steps 5, 10 and 12
    assert "Test loss " in stdout and "Test ppl " in stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "fc2"] and config["layers_to_transform"] == [1]
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_yaml_config_and_flags(tiny_checkpoint, data, mlx_xglm, tmp_path):
    config = tmp_path / "lora.yaml"
    config.write_text(
        f"model: {tiny_checkpoint}\ndata: {data}\ntrain: true\niters: 2\nrank: 4\nalpha: 2\n"
        "learning_rate: 1e-4\ntarget_modules: [q_proj, fc1]\n"
    )
    result = mlx_xglm("lora", "-c", config, "--rank", 2, "--val-batches", 0)
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["target_modules"]) == (2, 2.0, ["q_proj", "fc1"])


def test_grad_checkpoint_flag_and_yaml_key_train_the_same_adapter(tiny_checkpoint, data, mlx_xglm, tmp_path):
    """With dropout on (the model's and the adapters'), checkpointed runs give the plain run's weights."""
    args = ["lora", "--model", tiny_checkpoint, "--train", "--data", data, "--iters", 3, "--dropout", 0.2]
    args += ["--val-batches", 0, "--learning-rate", 1e-2]
    config = tmp_path / "lora.yaml"
    config.write_text("grad_checkpoint: true\n")
    weights = []
    for name, extra in (("plain", []), ("flag", ["--grad-checkpoint"]), ("yaml", ["-c", config])):
        result = mlx_xglm(*args, *extra, "--adapter-path", tmp_path / name)
        assert result.returncode == 0, result.stderr
        assert "Iter 3: Train loss " in result.stdout
        weights.append(mx.load(str(tmp_path / name / "adapter_model.safetensors")))
    for other in weights[1:]:
        assert max(np.abs(np.array(weights[0][k]) - np.array(other[k])).max() for k in weights[0]) <= 1e-5


def test_generate_with_adapter_path_uses_the_adapter(tiny_checkpoint, cli_adapter, mlx_xglm):
    out, _ = cli_adapter
    model, tokenizer = load(tiny_checkpoint, adapter_path=out)
    expected = generate(model, tokenizer, "The dog", max_tokens=8)
    result = mlx_xglm(
        "generate", "--model", tiny_checkpoint, "--adapter-path", out, "-p", "The dog", "-m", 8, "-q"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.removesuffix("\n") == expected
    base, _ = load(tiny_checkpoint)
    assert generate(base, tokenizer, "The dog", max_tokens=8) != expected


def test_test_only_reads_the_saved_adapter(tiny_checkpoint, data, cli_adapter, mlx_xglm):
    out, stdout = cli_adapter
    result = mlx_xglm("lora", "--model", tiny_checkpoint, "--data", data, "--test", "--adapter-path", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == stdout.strip().splitlines()[-1]


def test_fuse_writes_a_loadable_folder(tiny_checkpoint, cli_adapter, mlx_xglm, tmp_path):
    out, _ = cli_adapter
    result = mlx_xglm(
        "fuse", "--model", tiny_checkpoint, "--adapter-path", out, "--save-path", tmp_path / "f"
    )
    assert result.returncode == 0, result.stderr
    model, tokenizer = load(tmp_path / "f")
    adapted, _ = load(tiny_checkpoint, adapter_path=out)
    assert generate(model, tokenizer, "The dog", max_tokens=8) == generate(
        adapted, tokenizer, "The dog", max_tokens=8
    )
    again = mlx_xglm("fuse", "--model", tiny_checkpoint, "--adapter-path", out, "--save-path", tmp_path / "f")
    assert again.returncode == 1 and again.stderr.startswith("error: --save-path ")


def one_line_error(result) -> str:
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    return result.stderr


def test_bad_input_is_one_line(tiny_checkpoint, data, cli_adapter, make_checkpoint, mlx_xglm, tmp_path):
    base = ["lora", "--model", tiny_checkpoint, "--train", "--iters", 1]
    bad = data_folder(tmp_path / "bad")
    (bad / "train.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    assert f"{bad / 'train.jsonl'}:2: not valid JSON" in one_line_error(mlx_xglm(*base, "--data", bad))
    empty = data_folder(tmp_path / "empty")
    (empty / "valid.jsonl").write_text("\n")
    assert "valid.jsonl holds no rows" in one_line_error(mlx_xglm(*base, "--data", empty))
    assert "--num-layers 3 is more than the model's 2 layers" in one_line_error(
        mlx_xglm(*base, "--data", data, "--num-layers", 3)
    )
    assert "target module gate_proj does not exist" in one_line_error(
        mlx_xglm(*base, "--data", data, "--target-modules", "q_proj,gate_proj")
    )
    assert "--mask-prompt needs" in one_line_error(mlx_xglm(*base, "--data", data, "--mask-prompt"))
    assert "--data DIR" in one_line_error(mlx_xglm("lora", "--model", tiny_checkpoint, "--train"))
    other = make_checkpoint(seed=5, d_model=32)
    out, _ = cli_adapter
    error = one_line_error(mlx_xglm("generate", "--model", other, "--adapter-path", out, "-p", "a", "-m", 1))
    assert "made for another model shape" in error
    assert "made for another model shape" in one_line_error(
        mlx_xglm("chat", "--model", other, "--adapter-path", out)
    )
    error = one_line_error(
        mlx_xglm("generate", "--model", tiny_checkpoint, "--adapter-path", "nowhere", "-p", "a")
    )
    assert "--adapter-path nowhere does not exist" in error
    config = tmp_path / "c.yaml"
    config.write_text("lora_layers: 4\n")
    assert "unknown setting lora_layers" in one_line_error(mlx_xglm(*base, "--data", data, "-c", config))
    config.write_text("iters: many\n")
    assert "iters must be a number, got 'many'" in one_line_error(
        mlx_xglm(*base, "--data", data, "-c", config)
    )


def test_ctrl_c_saves_the_adapter_and_exits_130(tiny_checkpoint, data, tmp_path):
    args = ["lora", "--model", tiny_checkpoint, "--train", "--data", data, "--iters", 100000]
    args += ["--steps-per-report", 1, "--save-every", 100000, "--adapter-path", tmp_path / "a"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with child_process([*CLI, *map(str, args)], stdout=subprocess.PIPE, text=True, env=env) as process:
        line = ""
        while not line.startswith("Iter 2: Train loss"):
            line = read_within(process.stdout.readline, timeout=120)
            assert line, "lora ended before step 2"
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Saved adapter weights" in rest and "Interrupted: the adapter of the last finished step" in rest
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
