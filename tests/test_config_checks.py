"""config.json values that are valid JSON but cannot describe an XGLM model: one error, field and file."""

import json
import subprocess
import sys

import pytest
from xglm_fixtures import hub_config

from mlx_xglm import XGLMConfig, XGLMError, convert, load


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("d_model", 66, "must be divisible by attention_heads"),
        ("attention_heads", 0, "must be a positive integer"),
        ("attention_heads", -4, "must be a positive integer"),
        ("num_layers", 0, "must be a positive integer"),
        ("num_layers", -1, "must be a positive integer"),
        ("d_model", "64", "must be a positive integer"),
        ("ffn_dim", None, "must be a positive integer"),
        ("vocab_size", 1008.0, "must be a positive integer"),
        ("activation_function", "tanh", "must be one of gelu"),
        ("max_position_embeddings", -2, "must be a positive integer"),
        ("dropout", 1.5, "must be a number from 0 to 1"),
        ("scale_embedding", "yes", "must be true or false"),
        ("pad_token_id", -1, "must be an integer from 0 to max_position_embeddings"),
        ("eos_token_id", "2", "must be a token id"),
    ],
)
def test_a_bad_config_value_is_named_with_its_file(tiny_checkpoint, tmp_path, field, value, message):
    folder = tmp_path / "bad"
    folder.mkdir()
    for f in tiny_checkpoint.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(hub_config(**{field: value})))
    with pytest.raises(XGLMError, match=rf"{folder / 'config.json'}: config field {field} {message}") as e:
        load(folder)
    assert e.value.param == field
    with pytest.raises(XGLMError, match=rf"config field {field} {message}"):
        convert(folder, tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()


def test_a_config_built_in_code_is_checked_too():
    with pytest.raises(XGLMError, match=r"config field num_layers must be a positive integer, got 0"):
        XGLMConfig(num_layers=0)


def test_the_cli_names_the_field_in_one_line(tiny_checkpoint, tmp_path):
    folder = tmp_path / "zero"
    folder.mkdir()
    for f in tiny_checkpoint.iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    (folder / "config.json").write_text(json.dumps(hub_config(num_layers=0)))
    result = subprocess.run(
        [sys.executable, "-m", "mlx_xglm.cli", "generate", "--model", folder, "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert (
        result.stderr
        == f"error: {folder / 'config.json'}: config field num_layers must be a positive integer, got 0\n"
    )
