"""load(): local folders, sharded safetensors, the Hub cache, and clear errors for bad checkpoints."""

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from xglm_fixtures import fill_hub_cache, hub_config, random_weights

from mlx_xglm import XGLMError, XGLMForCausalLM, XGLMTokenizer, load
from mlx_xglm.model.positions import sinusoidal_table


def logits_of(model, ids=(2, 10, 20, 30)):
    return np.array(model(mx.array([list(ids)])))


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, folder)
    return folder


def test_load_returns_model_and_tokenizer(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint)
    assert isinstance(model, XGLMForCausalLM) and isinstance(tokenizer, XGLMTokenizer)
    assert not model.training


def test_lazy_load_gives_the_same_logits(tiny_checkpoint):
    eager, _ = load(tiny_checkpoint)
    lazy, _ = load(str(tiny_checkpoint), lazy=True)
    assert np.array_equal(logits_of(eager), logits_of(lazy))


def test_stored_positions_and_tied_head_are_ignored(tiny_checkpoint, checkpoint_copy):
    weights = load_file(checkpoint_copy / "model.safetensors")
    config = hub_config()
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    weights["model.embed_positions.weights"] = sinusoidal_table(
        config["max_position_embeddings"] + 2, config["d_model"], 1
    )
    save_file(weights, str(checkpoint_copy / "model.safetensors"), metadata={"format": "pt"})
    assert np.array_equal(logits_of(load(checkpoint_copy)[0]), logits_of(load(tiny_checkpoint)[0]))


def test_sharded_checkpoint_with_index(tiny_checkpoint, checkpoint_copy):
    weights = load_file(checkpoint_copy / "model.safetensors")
    (checkpoint_copy / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, shard_names in shards.items():
        save_file(
            {n: weights[n] for n in shard_names}, str(checkpoint_copy / file), metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(shard_names, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (checkpoint_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert np.array_equal(logits_of(load(checkpoint_copy)[0]), logits_of(load(tiny_checkpoint)[0]))


def test_missing_folder(tmp_path):
    with pytest.raises(XGLMError, match="does not exist"):
        load(tmp_path / "nope")


def test_missing_config(checkpoint_copy):
    (checkpoint_copy / "config.json").unlink()
    with pytest.raises(XGLMError, match="config.json"):
        load(checkpoint_copy)


def test_wrong_model_type(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["model_type"] = "gpt2"
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(XGLMError, match="model_type 'gpt2'"):
        load(checkpoint_copy)


def test_invalid_config_json(checkpoint_copy):
    (checkpoint_copy / "config.json").write_text("{not json")
    with pytest.raises(XGLMError, match="not valid JSON"):
        load(checkpoint_copy)


def test_missing_weights(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(XGLMError, match="no weights"):
        load(checkpoint_copy)


def test_truncated_weights(checkpoint_copy):
    file = checkpoint_copy / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(XGLMError, match="model.safetensors"):
        load(checkpoint_copy)


def test_missing_tensor_is_named(checkpoint_copy):
    weights = load_file(checkpoint_copy / "model.safetensors")
    del weights["model.layers.1.fc2.bias"]
    save_file(weights, str(checkpoint_copy / "model.safetensors"))
    with pytest.raises(XGLMError, match=r"model\.layers\.1\.fc2\.bias is missing"):
        load(checkpoint_copy)


def test_unexpected_tensor_is_named(checkpoint_copy):
    weights = load_file(checkpoint_copy / "model.safetensors")
    weights["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    save_file(weights, str(checkpoint_copy / "model.safetensors"))
    with pytest.raises(XGLMError, match=r"unexpected tensor model\.layers\.0\.extra\.weight"):
        load(checkpoint_copy)


def test_misshaped_tensor_is_named(checkpoint_copy):
    weights = load_file(checkpoint_copy / "model.safetensors")
    weights["model.layers.0.fc1.weight"] = weights["model.layers.0.fc1.weight"][:, :10].copy()
    save_file(weights, str(checkpoint_copy / "model.safetensors"))
    with pytest.raises(XGLMError, match=r"model\.layers\.0\.fc1\.weight has shape \(128, 10\)"):
        load(checkpoint_copy)


def test_index_naming_a_missing_shard(checkpoint_copy):
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (checkpoint_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(XGLMError, match="model-00001-of-00002.safetensors"):
        load(checkpoint_copy)


def test_hub_repo_id_uses_snapshot_download_with_allow_list(monkeypatch, tiny_checkpoint):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, allow_patterns))
        return str(tiny_checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, _ = load("facebook/xglm-tiny", revision="refs/pr/4")
    ((repo_id, revision, patterns),) = calls
    assert (repo_id, revision) == ("facebook/xglm-tiny", "refs/pr/4")
    assert "config.json" in patterns and "sentencepiece.bpe.model" in patterns
    assert not any(p.endswith((".msgpack", ".h5", ".ot")) for p in patterns)


def run_offline(hf_home, code):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_hub_id_loads_offline_from_a_filled_cache(tmp_path, tiny_checkpoint):
    fill_hub_cache(tmp_path, "facebook/xglm-tiny", tiny_checkpoint)
    code = (
        "from mlx_xglm import load; import mlx.core as mx\n"
        "m, t = load('facebook/xglm-tiny')\n"
        "print(t.encode('Hello'), m(mx.array([[2, 5]])).shape)"
    )
    result = run_offline(tmp_path, code)
    assert result.returncode == 0, result.stderr
    expected = XGLMTokenizer.from_pretrained(tiny_checkpoint).encode("Hello")
    assert result.stdout.strip() == f"{expected} (1, 2, {hub_config()['vocab_size']})"


def test_hub_id_missing_from_the_offline_cache_says_so(tmp_path):
    code = (
        "from mlx_xglm import load, XGLMError\n"
        "try:\n    load('facebook/xglm-564M')\n"
        "except XGLMError as e:\n    print(e)"
    )
    result = run_offline(tmp_path, code)
    assert result.returncode == 0, result.stderr
    assert "not in the local Hub cache" in result.stdout


def test_random_weights_fixture_matches_config():
    config = hub_config(num_layers=1)
    weights = random_weights(config)
    assert weights["model.embed_tokens.weight"].shape == (config["vocab_size"], config["d_model"])
    assert not any(name.startswith("model.layers.1.") for name in weights)
