"""Adapters that would silently ruin every output are refused, as peft refuses them, and training that
goes non-finite stops before it saves anything."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import pytest
from lora_fixtures import data_folder, random_adapter
from safetensors.numpy import load_file, save_file

from mlx_xglm import XGLMError, load
from mlx_xglm.tuning import TrainingArgs, apply_lora, load_dataset, lora_config, save_adapter, train
from mlx_xglm.tuning.data import read_jsonl


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint, tmp_path_factory):
    return random_adapter(tiny_checkpoint, tmp_path_factory.mktemp("adapter") / "a")


def edited(adapter, tmp_path, config_changes=None, tensor_change=None):
    """A copy of `adapter` with changed config fields and/or tensors."""
    out = tmp_path / "edited"
    out.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(config_changes or {})
    (out / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(adapter / "adapter_model.safetensors")
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, out / "adapter_model.safetensors")
    return out


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lora_alpha": math.nan}, "lora_alpha must be a finite number"),
        ({"lora_alpha": "16"}, "lora_alpha must be a finite number"),
        ({"lora_alpha": True}, "lora_alpha must be a finite number"),
        ({"r": 0}, "r must be a whole number above 0"),
        ({"r": 4}, "has rank 8, but its adapter_config.json says 4"),
        ({"alpha_pattern": {"q_proj": math.inf}}, "alpha_pattern['q_proj'] must be a finite number"),
        ({"alpha_pattern": ["q_proj", 8]}, "alpha_pattern must map module names"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] must be a whole number above 0"),
        ({"rank_pattern": {"q_proj": 4}}, "has rank 8, but its adapter_config.json says 4"),
        ({"alpha_pattern": {"q_proj[": 8}}, "is not a valid module pattern"),
        ({"lora_dropout": 1.5}, "lora_dropout must be a number in [0, 1)"),
    ],
)
def test_bad_adapter_configs_are_refused(tiny_checkpoint, adapter, tmp_path, changes, message):
    with pytest.raises(XGLMError) as e:
        load(tiny_checkpoint, adapter_path=edited(adapter, tmp_path, changes))
    assert message in str(e.value) and e.value.param == "adapter_path"


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_adapter_weights_are_refused(tiny_checkpoint, adapter, tmp_path, value):
    def poison(tensors):
        name = next(n for n in sorted(tensors) if n.endswith("lora_B.weight"))
        tensors[name][0, 0] = value

    with pytest.raises(XGLMError, match="NaN or infinite") as e:
        load(tiny_checkpoint, adapter_path=edited(adapter, tmp_path, tensor_change=poison))
    assert e.value.param == "adapter_path"


def test_lora_config_refuses_non_finite_alpha(tiny_checkpoint):
    model, _ = load(tiny_checkpoint)
    for alpha in (math.nan, math.inf, -math.inf):
        with pytest.raises(XGLMError) as e:
            lora_config(model, alpha=alpha)
        assert e.value.param == "alpha"


@pytest.mark.parametrize(
    ("field", "value"),
    [("learning_rate", math.inf), ("learning_rate", math.nan), ("seed", -1), ("seed", 2**40)],
)
def test_training_args_refuse_bad_values(field, value):
    with pytest.raises(XGLMError) as e:
        TrainingArgs(**{field: value}).check()
    assert e.value.param == field


def test_a_diverging_run_stops_before_saving(tiny_checkpoint, tmp_path):
    model, tokenizer = load(tiny_checkpoint)
    config = lora_config(model)
    apply_lora(model, config)
    splits = load_dataset(data_folder(tmp_path / "data"), tokenizer)
    out = tmp_path / "out"
    args = TrainingArgs(iters=20, learning_rate=1e30, save_every=1, val_batches=0, steps_per_eval=20)
    with pytest.raises(XGLMError, match="not saved") as e:
        train(model, splits["train"], splits["valid"], args, save=lambda it: save_adapter(model, out, config))
    assert e.value.param == "learning_rate"
    if out.exists():  # what was saved before the run went bad is the last finite adapter
        for value in mx.load(str(out / "adapter_model.safetensors")).values():
            assert mx.isfinite(value).all().item()


def test_jsonl_lines_end_at_newline_only(tmp_path):
    file = tmp_path / "train.jsonl"
    file.write_text('{"text": "a\u2028b\u0085c\u2029d"}\n{"text": "e"}\r\n', encoding="utf-8")
    assert [row["text"] for _, row in read_jsonl(file)] == ["a\u2028b\u0085c\u2029d", "e"]
