"""convert(): round trips through dtypes and quantization, output layout, safety, the Hub, the CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from reference import reference_logits, reference_model
from safetensors.numpy import load_file, save_file
from xglm_fixtures import build_checkpoint, hub_config, random_weights

from mlx_xglm import XGLMError, convert, load
from mlx_xglm.checkpoints.quantize import mixed_recipe

IDS = [[2, 10, 20, 30, 40, 50, 60, 70], [2, 100, 200, 300, 400, 500, 600, 700]]
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def soft_checkpoint(tmp_path_factory, sp_model):
    """A tiny checkpoint whose next-token distributions are spread out (entropy ~1.9 nats), so that
    quantization error shows up in the KL divergence instead of vanishing behind one-hot softmaxes."""
    weights = random_weights(hub_config(), seed=3)
    weights["model.embed_tokens.weight"] *= 0.2
    return build_checkpoint(tmp_path_factory.mktemp("soft"), sp_model, weights=weights)


def log_probs(folder) -> np.ndarray:
    logits = load(folder)[0](mx.array(IDS)).astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def kl_from(reference: np.ndarray, folder) -> float:
    """Mean KL(reference || converted) of the next-token distributions over all positions."""
    converted = log_probs(folder)
    return float((np.exp(reference) * (reference - converted)).sum(-1).mean())


@pytest.fixture(scope="module")
def reference_log_probs(soft_checkpoint):
    return log_probs(soft_checkpoint)


@pytest.fixture(scope="module")
def converted(soft_checkpoint, tmp_path_factory):
    """convert(soft_checkpoint, **options) once per option set; returns the output folder."""
    cache = {}

    def make(**options):
        key = json.dumps(options, sort_keys=True)
        if key not in cache:
            cache[key] = tmp_path_factory.mktemp("out") / "mlx"
            convert(soft_checkpoint, cache[key], verbose=False, **options)
        return cache[key]

    return make


# Each bound is about 3x the KL measured on this fixture on the CPU (the figure after it).
@pytest.mark.parametrize(
    ("options", "bound"),
    [
        ({"dtype": "float32"}, 1e-9),  # 0: the same weights
        ({"dtype": "float16"}, 2e-6),  # 6.7e-7
        ({"dtype": "bfloat16"}, 1.5e-4),  # 4.9e-5
        ({"quantize": True, "q_bits": 8}, 2e-4),  # 6.7e-5
        ({"quantize": True, "q_bits": 4}, 0.045),  # 0.0156
        ({"quantize": True, "quant_predicate": "mixed_3_6"}, 0.035),  # 0.0115
        ({"quantize": True, "q_mode": "mxfp8"}, 0.004),  # 0.00125
        ({"quantize": True, "q_mode": "mxfp4"}, 0.08),  # 0.0284
        ({"quantize": True, "q_mode": "nvfp4"}, 0.05),  # 0.0168
    ],
)
def test_round_trip_stays_close_to_float32(converted, reference_log_probs, options, bound):
    assert kl_from(reference_log_probs, converted(**options)) < bound


def test_more_bits_means_less_divergence(converted, reference_log_probs):
    kl = {bits: kl_from(reference_log_probs, converted(quantize=True, q_bits=bits)) for bits in (2, 4, 8)}
    assert kl[8] < kl[4] < kl[2]


def test_mixed_recipe_beats_its_low_bits_alone(converted, reference_log_probs):
    mixed = kl_from(reference_log_probs, converted(quantize=True, quant_predicate="mixed_2_6"))
    plain = kl_from(reference_log_probs, converted(quantize=True, q_bits=2))
    assert mixed < plain / 2


def test_embed_bits_quantize_the_tied_head_separately(converted, reference_log_probs):
    folder = converted(quantize=True, embed_bits=8)
    quantization = json.loads((folder / "config.json").read_text())["quantization"]
    assert quantization["bits"] == 4
    assert quantization["model.embed_tokens"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    model, _ = load(folder)
    assert model.model.embed_tokens.bits == 8 and model.layers[0].fc1.bits == 4
    plain = kl_from(reference_log_probs, converted(quantize=True))
    assert kl_from(reference_log_probs, folder) < plain / 2


def test_float_dtype_is_written_and_recorded(converted):
    folder = converted(dtype="bfloat16")
    weights = mx.load(str(folder / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_default_dtype_keeps_the_checkpoints(converted, soft_checkpoint):
    weights = mx.load(str(converted() / "model.safetensors"))
    assert weights.keys() == load_file(soft_checkpoint / "model.safetensors").keys()
    assert {v.dtype for v in weights.values()} == {mx.float32}


def test_quantized_config_and_bits_per_weight(soft_checkpoint, tmp_path):
    report = convert(soft_checkpoint, tmp_path / "q4", quantize=True, verbose=False)
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    weights = mx.load(str(tmp_path / "q4" / "model.safetensors"))
    assert weights["model.layers.0.fc1.weight"].dtype == mx.uint32
    assert "model.layers.0.fc1.biases" in weights and "model.layers.0.fc1.bias" in weights
    n_params = sum(v.size for v in load_file(soft_checkpoint / "model.safetensors").values())
    assert report.weight_bytes == sum(v.nbytes for v in weights.values())
    assert report.bits_per_weight == pytest.approx(report.weight_bytes * 8 / n_params)
    assert 4.5 < report.bits_per_weight < 8


def test_mixed_recipe_records_per_module_bits(converted):
    quantization = json.loads(
        (converted(quantize=True, quant_predicate="mixed_3_6") / "config.json").read_text()
    )["quantization"]
    assert quantization["model.embed_tokens"]["bits"] == 6
    assert quantization["model.layers.0.self_attn.v_proj"]["bits"] == 6
    assert quantization["model.layers.1.fc2"]["bits"] == 6
    assert "model.layers.0.fc1" not in quantization  # uses the defaults
    assert quantization["bits"] == 3


def test_mixed_recipe_names_xglm_modules():
    recipe = mixed_recipe(3, 6, num_layers=24)
    high = {i for i in range(24) if recipe(f"model.layers.{i}.fc2", None)["bits"] == 6}
    assert {0, 1, 2, 21, 22, 23} <= high and 10 not in high
    assert recipe("model.layers.0.fc1", None)["bits"] == 3
    assert recipe("model.layers.0.self_attn.q_proj", None)["bits"] == 3
    assert recipe("model.layers.0.self_attn.v_proj", None)["bits"] == 6
    assert recipe("model.embed_tokens", None)["bits"] == 6


def test_group_size_wider_than_a_layer_leaves_it_in_float(soft_checkpoint, tmp_path):
    # d_model is 64: only fc2 (input 128) can use groups of 128.
    convert(soft_checkpoint, tmp_path / "g128", quantize=True, q_group_size=128, verbose=False)
    model, _ = load(tmp_path / "g128")
    assert model.layers[0].fc2.group_size == 128
    assert not hasattr(model.layers[0].fc1, "bits")
    assert model(mx.array(IDS)).shape == (2, 8, hub_config()["vocab_size"])


@pytest.mark.parametrize(
    ("options", "param", "message"),
    [
        ({"quantize": True, "q_bits": 7}, "q_bits", "q_bits 7"),
        ({"quantize": True, "q_group_size": 48}, "q_group_size", "q_group_size 48"),
        ({"quantize": True, "q_mode": "mxfp4", "q_group_size": 64}, "q_group_size", "q_group_size 64"),
        ({"quantize": True, "q_mode": "int4"}, "q_mode", "q_mode 'int4'"),
        (
            {"quantize": True, "quant_predicate": "mixed_9_9"},
            "quant_predicate",
            "quant_predicate 'mixed_9_9'",
        ),
        ({"quantize": True, "quant_predicate": "mixed_3_6", "q_mode": "mxfp4"}, "q_mode", "q_mode affine"),
        ({"quantize": True, "embed_bits": 7}, "embed_bits", "embed_bits 7"),
        ({"embed_bits": 8}, "embed_bits", "embed_bits only applies when quantizing"),
        ({"dtype": "float64"}, "dtype", "dtype 'float64'"),
        ({"quantize": True, "dequantize": True}, "dequantize", "cannot be combined with quantize"),
    ],
)
def test_bad_options_are_named(soft_checkpoint, tmp_path, options, param, message):
    with pytest.raises(XGLMError, match=message) as error:
        convert(soft_checkpoint, tmp_path / "out", verbose=False, **options)
    assert error.value.param == param
    assert not (tmp_path / "out").exists()


def test_dequantize_round_trip(converted, tmp_path):
    quantized = converted(quantize=True, q_bits=8)
    convert(quantized, tmp_path / "float", dequantize=True, verbose=False)
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    assert "quantization" not in config
    q_weights = mx.load(str(quantized / "model.safetensors"))
    weights = mx.load(str(tmp_path / "float" / "model.safetensors"))
    expected = mx.dequantize(
        q_weights["model.layers.1.fc1.weight"],
        q_weights["model.layers.1.fc1.scales"],
        q_weights["model.layers.1.fc1.biases"],
        group_size=64,
        bits=8,
    )
    assert weights["model.layers.1.fc1.weight"].dtype == mx.float32
    assert mx.array_equal(weights["model.layers.1.fc1.weight"], expected).item()
    assert np.allclose(log_probs(tmp_path / "float"), log_probs(quantized), atol=1e-4)


@pytest.mark.parametrize("options", [{"quantize": True}, {"dtype": "float16"}])
def test_converting_a_quantized_folder_needs_dequantize(converted, tmp_path, options):
    with pytest.raises(XGLMError, match="already quantized.*dequantize"):
        convert(converted(quantize=True, q_bits=8), tmp_path / "again", verbose=False, **options)


def test_dequantizing_a_float_folder_is_refused(soft_checkpoint, tmp_path):
    with pytest.raises(XGLMError, match="not quantized"):
        convert(soft_checkpoint, tmp_path / "out", dequantize=True, verbose=False)


def test_output_layout(converted):
    folder = converted(quantize=True, q_bits=8)
    names = {p.name for p in folder.iterdir()}
    assert names == {
        "config.json",
        "model.safetensors",
        "sentencepiece.bpe.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "README.md",
    }
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["decoder_start_token_id"] == 2
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: mlx" in card and "- mlx" in card
    assert "8-bit affine quantization, group size 64" in card and "from mlx_xglm import load" in card


def test_sharded_output_loads_back(soft_checkpoint, tmp_path):
    # 526 kB of weights, the largest tensor 258 kB.
    convert(soft_checkpoint, tmp_path / "sharded", max_shard_size=300_000, verbose=False)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards[0].endswith("-of-" + f"{len(shards):05d}.safetensors")
    for shard in shards:
        assert (tmp_path / "sharded" / shard).stat().st_size < 300_000 + 10_000
    assert np.array_equal(log_probs(tmp_path / "sharded"), log_probs(soft_checkpoint))


def test_sharded_input_with_index(soft_checkpoint, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(soft_checkpoint, source)
    weights = load_file(source / "model.safetensors")
    (source / "model.safetensors").unlink()
    names = sorted(weights)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2]), start=1):
        file = f"model-0000{i}-of-00002.safetensors"
        save_file({n: weights[n] for n in part}, str(source / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    convert(source, tmp_path / "out", verbose=False)
    assert np.array_equal(log_probs(tmp_path / "out"), log_probs(soft_checkpoint))


def test_existing_output_folder_is_left_untouched(soft_checkpoint, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(XGLMError, match="already exists"):
        convert(soft_checkpoint, target, verbose=False)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize(
    "interruption, raised",
    [
        (KeyboardInterrupt(), KeyboardInterrupt),
        (OSError(28, "No space left on device"), XGLMError),
    ],
)
def test_interrupted_conversion_leaves_nothing(soft_checkpoint, tmp_path, monkeypatch, interruption, raised):
    def fail(*args, **kwargs):
        raise interruption

    monkeypatch.setattr(mx, "save_safetensors", fail)
    with pytest.raises(raised):
        convert(soft_checkpoint, tmp_path / "out", verbose=False)
    assert list(tmp_path.iterdir()) == []


def test_truncated_safetensors_input_is_named(soft_checkpoint, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(soft_checkpoint, source)
    file = source / "model.safetensors"
    file.write_bytes(file.read_bytes()[:5000])
    with pytest.raises(XGLMError, match="model.safetensors"):
        convert(source, tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()


def test_tied_lm_head_copy_is_dropped(sp_model, tmp_path):
    weights = random_weights(hub_config(), seed=4)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].copy()
    source = build_checkpoint(tmp_path / "source", sp_model, weights=weights)
    convert(source, tmp_path / "out", verbose=False)
    assert "lm_head.weight" not in mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert "tie_word_embeddings" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_distinct_lm_head_is_kept_untied(sp_model, tmp_path):
    weights = untied_weights()
    source = build_checkpoint(tmp_path / "source", sp_model, weights=weights)
    with pytest.warns(UserWarning, match="untied head"):
        convert(source, tmp_path / "out", quantize=True, q_bits=8, verbose=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    model, _ = load(tmp_path / "out")
    assert model.lm_head.bits == 8
    hidden = model.model(mx.array(IDS))
    head = mx.array(weights["lm_head.weight"])
    expected = np.array(hidden @ head.T)
    # The 8-bit head's error, measured: 0.179 at the largest logit 32.4 (0.55%); bound 2.7x that.
    assert np.abs(np.array(model(mx.array(IDS))) - expected).max() < 0.015 * np.abs(expected).max()


def untied_weights():
    weights = random_weights(hub_config(), seed=5)
    weights["lm_head.weight"] = random_weights(hub_config(), seed=6)["model.embed_tokens.weight"]
    return weights


def test_load_unties_a_distinct_head_and_says_so(sp_model, tmp_path):
    source = build_checkpoint(tmp_path / "source", sp_model, weights=untied_weights())
    with pytest.warns(UserWarning, match="untied head"):
        model, _ = load(source)
    assert model.config.tie_word_embeddings is False


@pytest.mark.reference
def test_untied_head_matches_transformers(sp_model, tmp_path, transformers):
    source = build_checkpoint(
        tmp_path / "source", sp_model, weights=untied_weights(), tie_word_embeddings=False
    )
    model, _ = load(source)
    expected = reference_logits(reference_model(source), IDS)
    assert np.abs(np.array(model(mx.array(IDS))) - expected).max() < 1e-4
    assert np.abs(np.array(model.forward(mx.array(IDS)).logits) - expected).max() < 1e-4


def test_hub_repo_id_and_revision(monkeypatch, soft_checkpoint, tmp_path):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, allow_patterns))
        return str(soft_checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    convert("facebook/xglm-tiny", tmp_path / "out", revision="refs/pr/4", verbose=False)
    ((repo_id, revision, patterns),) = calls
    assert (repo_id, revision) == ("facebook/xglm-tiny", "refs/pr/4")
    assert "pytorch_model.bin" in patterns and "*.safetensors" in patterns
    assert "base_model: facebook/xglm-tiny" in (tmp_path / "out" / "README.md").read_text()


def test_upload_repo_uses_the_hub_upload_api(monkeypatch, soft_checkpoint, tmp_path):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs.get("exist_ok")))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    convert(soft_checkpoint, tmp_path / "out", upload_repo="me/xglm-tiny-mlx", verbose=False)
    assert calls[0] == ("create_repo", "me/xglm-tiny-mlx", True)
    assert calls[1][:2] == ("upload_folder", "me/xglm-tiny-mlx") and "model.safetensors" in calls[1][2]
    assert "# me/xglm-tiny-mlx" in (tmp_path / "out" / "README.md").read_text()


def test_failed_upload_keeps_the_folder_and_says_so(monkeypatch, soft_checkpoint, tmp_path):
    import huggingface_hub

    class OfflineApi:
        def create_repo(self, repo_id, **kwargs):
            raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    with pytest.raises(XGLMError, match=r"upload_repo me/x: upload failed \(network is unreachable\)"):
        convert(soft_checkpoint, tmp_path / "out", upload_repo="me/x", verbose=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def run_cli(*args, cwd=None):
    env = {**os.environ, "MLX_XGLM_DEBUG": ""}
    return subprocess.run(
        [sys.executable, "-m", "mlx_xglm.cli", "convert", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def test_cli_converts(soft_checkpoint, tmp_path):
    result = run_cli(
        "--hf-path", str(soft_checkpoint), "--mlx-path", str(tmp_path / "q"), "-q", "--q-bits", "8"
    )
    assert result.returncode == 0, result.stderr
    assert "bits per weight" in result.stderr and "peak memory" in result.stderr
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["bits"] == 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mlx-path", "{tmp}"], "already exists"),
        (["--mlx-path", "{tmp}/out", "-q", "--q-bits", "7"], "--q-bits 7"),
        (["--mlx-path", "{tmp}/out", "-q", "-d"], "--dequantize cannot be combined with quantize"),
        (["--mlx-path", "{tmp}/out", "--embed-bits", "8"], "--embed-bits only applies when quantizing"),
    ],
)
def test_cli_errors_are_one_line(soft_checkpoint, tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    result = run_cli("--model", str(soft_checkpoint), *args)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1


def test_top_level_script(soft_checkpoint, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "convert.py"), "--hf-path", str(soft_checkpoint), "--mlx-path", "out"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("options", [{"quantize": True}, {"quantize": True, "q_mode": "mxfp4"}])
def test_quantizing_in_row_blocks_changes_nothing(converted, soft_checkpoint, tmp_path, monkeypatch, options):
    monkeypatch.setattr(sys.modules["mlx_xglm.checkpoints.convert"], "ROWS_PER_BLOCK", 100)
    convert(soft_checkpoint, tmp_path / "blocks", verbose=False, **options)
    blocks = mx.load(str(tmp_path / "blocks" / "model.safetensors"))
    whole = mx.load(str(converted(**options) / "model.safetensors"))
    assert blocks.keys() == whole.keys()
    assert all(mx.array_equal(blocks[k], whole[k]).item() for k in whole)


def test_dequantizing_in_row_blocks_changes_nothing(converted, tmp_path, monkeypatch):
    quantized = converted(quantize=True, q_bits=8)
    convert(quantized, tmp_path / "whole", dequantize=True, verbose=False)
    monkeypatch.setattr(sys.modules["mlx_xglm.checkpoints.convert"], "ROWS_PER_BLOCK", 100)
    convert(quantized, tmp_path / "blocks", dequantize=True, verbose=False)
    blocks = mx.load(str(tmp_path / "blocks" / "model.safetensors"))
    whole = mx.load(str(tmp_path / "whole" / "model.safetensors"))
    assert all(mx.array_equal(blocks[k], whole[k]).item() for k in whole)


def test_a_callable_predicate_picks_modules_and_bits(soft_checkpoint, tmp_path):
    def predicate(path, module):
        if path.endswith("fc1"):
            return False
        return {"bits": 8} if path.endswith("v_proj") else True

    convert(soft_checkpoint, tmp_path / "out", quantize=True, quant_predicate=predicate, verbose=False)
    quantization = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert quantization["model.layers.1.self_attn.v_proj"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    model, _ = load(tmp_path / "out")
    assert not hasattr(model.layers[0].fc1, "bits") and model.layers[0].fc2.bits == 4
