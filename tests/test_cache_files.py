"""Prompt-cache files: a bad header or array is one XGLMError, a cache from another model is refused."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_xglm import (
    XGLMError,
    load,
    load_prompt_cache,
    make_prompt_cache,
    model_fingerprint,
    save_prompt_cache,
    stream_generate,
)
from mlx_xglm.decoding.cache_files import MAX_OFFSET

CLI = [sys.executable, "-m", "mlx_xglm.cli"]
KEYS = mx.zeros((1, 4, 3, 16))


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load(tiny_checkpoint)


def write_cache(path, layers, arrays=None):
    """A cache file with exactly this header and these arrays, as a crafted file would have them."""
    header = {"mlx_xglm.cache": layers if isinstance(layers, str) else json.dumps(layers)}
    mx.save_safetensors(str(path), arrays if arrays is not None else {}, metadata=header)
    return path


def good_arrays(n_layers=2, keys=KEYS):
    return {f"{i}.{part}": keys for i in range(n_layers) for part in ("keys", "values")}


@pytest.mark.parametrize(
    "layers, arrays, message",
    [
        ("not json", {}, "its header is not valid JSON"),
        (json.dumps({"type": "KVCache"}), {}, "is not a list of layers"),
        ([], {}, "is not a list of layers"),
        ([{"type": "EvilCache", "offset": 0}], {}, "layer 0 has unknown type 'EvilCache'"),
        (["KVCache"], {}, "layer 0 has unknown type None"),
        ([{"type": "KVCache", "offset": -3}] * 2, good_arrays(), "layer 0 has offset -3"),
        ([{"type": "KVCache", "offset": "3"}] * 2, good_arrays(), "layer 0 has offset '3'"),
        ([{"type": "KVCache", "offset": 3}] * 2, {}, "layer 0 holds 3 positions but its keys or values"),
        ([{"type": "KVCache", "offset": 3}] * 2, {"0.keys": KEYS}, "keys or values are missing"),
        ([{"type": "KVCache", "offset": 3}] * 2, good_arrays(keys=mx.zeros((3, 16))), "has keys \\(3, 16\\)"),
        (
            [{"type": "KVCache", "offset": 5}] * 2,
            good_arrays(),
            "stores 3 positions but its offset implies 5",
        ),
        (
            [{"type": "RotatingKVCache", "offset": 10**12, "max_size": 3}] * 2,
            good_arrays(),
            f"offset 1000000000000 \\(expected 0 to {MAX_OFFSET}\\)",
        ),
        ([{"type": "RotatingKVCache", "offset": 3, "max_size": 0}] * 2, good_arrays(), "has max_size 0"),
        (
            [{"type": "KVCache", "offset": 3}, {"type": "KVCache", "offset": 0}],
            {"0.keys": KEYS, "0.values": KEYS},
            "its layers disagree",
        ),
        ([{"type": "KVCache", "offset": 3}], good_arrays(), "unexpected array 1.keys"),
        (
            [{"type": "KVCache", "offset": 3}] * 2,
            good_arrays(keys=mx.zeros((1, 4, 3, 16), mx.int32)),
            "holds mlx.core.int32 keys",
        ),
    ],
)
def test_a_broken_cache_file_is_one_error_naming_it(tmp_path, layers, arrays, message):
    path = write_cache(tmp_path / "c.safetensors", layers, arrays)
    with pytest.raises(XGLMError, match=rf"c\.safetensors is not a usable prompt cache: .*{message}"):
        load_prompt_cache(path)


def test_a_file_without_the_cache_header_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    mx.save_safetensors(str(path), {"x": mx.zeros(2)})
    with pytest.raises(XGLMError, match="has no mlx_xglm.cache header"):
        load_prompt_cache(path)


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(b"\xff" * 100)
    with pytest.raises(XGLMError, match="is not a prompt cache written by save_prompt_cache"):
        load_prompt_cache(path)


def filled_cache(model, tokenizer):
    cache = make_prompt_cache(model)
    list(stream_generate(model, tokenizer, "The dog", max_tokens=0, prompt_cache=cache))
    return cache


def test_a_saved_cache_round_trips_with_its_fingerprint(tiny, tmp_path):
    model, tokenizer = tiny
    fingerprint = model_fingerprint(model, tokenizer)
    save_prompt_cache(tmp_path / "c.safetensors", filled_cache(model, tokenizer), fingerprint=fingerprint)
    cache = load_prompt_cache(tmp_path / "c.safetensors", fingerprint=fingerprint)
    assert cache[0].offset == 3


def test_a_cache_made_by_another_model_of_the_same_shape_is_refused(tiny, make_checkpoint, tmp_path):
    model, tokenizer = tiny
    other_model, other_tokenizer = load(make_checkpoint(seed=5))
    mine = model_fingerprint(model, tokenizer)
    theirs = model_fingerprint(other_model, other_tokenizer)
    assert mine != theirs and mine == model_fingerprint(*load(make_checkpoint(seed=0)))
    save_prompt_cache(tmp_path / "c.safetensors", filled_cache(model, tokenizer), fingerprint=mine)
    with pytest.raises(XGLMError, match="was made by another model or tokenizer") as e:
        load_prompt_cache(tmp_path / "c.safetensors", fingerprint=theirs)
    assert e.value.param == "prompt_cache"


def run_cli(*args, env=None):
    return subprocess.run(
        [*CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**{k: v for k, v in os.environ.items() if k != "MLX_XGLM_DEBUG"}, **(env or {})},
    )


def test_the_cli_refuses_a_cache_file_of_another_model(tiny_checkpoint, make_checkpoint, tmp_path):
    cache = tmp_path / "c.safetensors"
    made = run_cli(
        "generate", "--model", tiny_checkpoint, "--prompt", "The dog", "-m", 0, "--prompt-cache-file", cache
    )
    assert made.returncode == 0, made.stderr
    other = make_checkpoint(seed=7)
    result = run_cli("generate", "--model", other, "--prompt", " and", "--prompt-cache-file", cache)
    assert result.returncode == 1 and result.stdout == ""
    assert (
        result.stderr.startswith(f"error: {cache} was made by another model")
        and result.stderr.count("\n") == 1
    )


def test_the_cli_checks_the_cache_folder_before_generating(tiny_checkpoint, tmp_path):
    cache = tmp_path / "missing" / "c.safetensors"
    result = run_cli(
        "generate", "--model", tiny_checkpoint, "--prompt", "The dog", "--prompt-cache-file", cache
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"error: --prompt-cache-file {cache}: folder {cache.parent} does not exist; create it first\n"
    )


def test_the_cli_reports_a_crafted_cache_file_in_one_line(tiny_checkpoint, tmp_path):
    cache = write_cache(tmp_path / "c.safetensors", [{"type": "KVCache", "offset": -1}] * 2, good_arrays())
    result = run_cli("generate", "--model", tiny_checkpoint, "--prompt", "x", "--prompt-cache-file", cache)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: ") and "layer 0 has offset -1" in result.stderr
    assert result.stderr.count("\n") == 1
