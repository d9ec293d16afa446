"""LoRA and QLoRA: the layer's math, what trains, the loop, masking, resuming, saving and fusing."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from lora_fixtures import data_folder, train_adapter, write_jsonl
from mlx.utils import tree_flatten

from mlx_xglm import XGLMError, convert, load
from mlx_xglm.checkpoints.adapters import read_adapter_weights
from mlx_xglm.tuning import (
    LoRALinear,
    TrainingArgs,
    apply_lora,
    evaluate,
    fuse,
    iterate_batches,
    load_dataset,
    lora_config,
    save_adapter,
    train,
)
from mlx_xglm.tuning.lora import resume_adapter

IDS = [[2, 100, 200, 300, 400, 500, 17, 33]]


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    return data_folder(tmp_path_factory.mktemp("text-data"))


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, text_data, tmp_path_factory):
    """An adapter trained for a dozen steps on the last layer's q_proj, v_proj and fc2."""
    out = tmp_path_factory.mktemp("adapter")
    return train_adapter(
        tiny_checkpoint, text_data, out, target_modules=["q_proj", "v_proj", "fc2"], num_layers=1
    )


def logits(model, ids=IDS) -> np.ndarray:
    return np.array(model(mx.array(ids)))


def test_lora_linear_adds_the_scaled_low_rank_update():
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, scaling=0.5)
    layer.lora_B = mx.random.normal((8, 4))
    x = mx.random.normal((2, 3, 16))
    expected = np.array(base(x)) + 0.5 * np.array(x) @ np.array(layer.lora_A).T @ np.array(layer.lora_B).T
    assert np.abs(np.array(layer(x)) - expected).max() < 1e-5


def test_fresh_adapter_starts_at_zero_with_peft_init(tiny_checkpoint):
    model, _ = load(tiny_checkpoint)
    before = logits(model)
    apply_lora(model, lora_config(model))
    layer = model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and not np.array(layer.lora_B).any()
    # kaiming_uniform(a=sqrt(5)) on [r, in] is U(-1/sqrt(in), 1/sqrt(in))
    assert np.abs(np.array(layer.lora_A)).max() <= 64**-0.5 and np.array(layer.lora_A).std() > 0.05
    assert np.array_equal(logits(model), before)


def test_only_the_adapters_train(tiny_checkpoint):
    model, _ = load(tiny_checkpoint)
    paths = apply_lora(model, lora_config(model, target_modules=["q_proj", "fc1"], num_layers=1))
    assert paths == ["model.layers.1.self_attn.q_proj", "model.layers.1.fc1"]
    names = {name for name, _ in tree_flatten(model.trainable_parameters())}
    assert names == {f"{p}.{part}" for p in paths for part in ("lora_A", "lora_B")}


def test_parameter_count_is_the_checkpoints_values_plus_the_adapters(tiny_checkpoint, tmp_path):
    from safetensors.numpy import load_file

    from mlx_xglm.tuning import trainable_parameters

    stored = sum(v.size for v in load_file(str(tiny_checkpoint / "model.safetensors")).values())
    convert(tiny_checkpoint, tmp_path / "q4", quantize=True, q_bits=4, verbose=False)
    for path in (tiny_checkpoint, tmp_path / "q4"):
        model, _ = load(path)
        apply_lora(model, lora_config(model))
        # Not counted: the arrays that only view these values (a fast path's fused q/k/v, weights transposed).
        trainable, total = trainable_parameters(model)
        # Rank 8 A and B on q/k/v/out_proj (64 -> 64) and fc1, fc2 (64 <-> 128) of both layers.
        lora = 2 * 8 * (4 * (64 + 64) + 2 * (64 + 128))
        assert (trainable, total) == (lora, stored + lora)


def test_a_few_dozen_steps_lower_the_training_loss(tiny_checkpoint, text_data):
    model, tokenizer = load(tiny_checkpoint)
    apply_lora(model, lora_config(model))
    data = load_dataset(text_data, tokenizer)
    before = evaluate(model, data["train"], 4)
    args = TrainingArgs(iters=30, learning_rate=1e-2, val_batches=0)
    train(model, data["train"], data["valid"], args, save=lambda it: None)
    assert evaluate(model, data["train"], 4) < 0.5 * before


def test_training_reports_losses_speed_and_memory(tiny_checkpoint, text_data):
    model, tokenizer = load(tiny_checkpoint)
    apply_lora(model, lora_config(model))
    data = load_dataset(text_data, tokenizer)
    updates, saved = [], []
    args = TrainingArgs(iters=6, steps_per_report=3, steps_per_eval=3, save_every=4, val_batches=1)
    train(model, data["train"], data["valid"], args, save=saved.append, callback=updates.append)
    kinds = [(u.kind, u.iteration) for u in updates if u.kind != "step"]
    assert kinds == [
        ("val", 0), ("train", 3), ("val", 3), ("save", 4), ("train", 6), ("val", 6), ("save", 6)
    ]  # fmt: skip
    assert saved == [4, 6]
    report = next(u for u in updates if u.kind == "train")
    assert (
        report.tokens_per_second > 0
        and report.peak_memory > 0
        and report.learning_rate == pytest.approx(1e-4)
    )
    assert not model.training


def test_ctrl_c_saves_the_last_finished_step(tiny_checkpoint, text_data):
    model, tokenizer = load(tiny_checkpoint)
    apply_lora(model, lora_config(model))
    data = load_dataset(text_data, tokenizer)
    saved = []

    def interrupt(update):
        if update.kind == "step" and update.iteration == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            model, data["train"], data["valid"], TrainingArgs(iters=20), save=saved.append, callback=interrupt
        )
    assert saved == [4]


def test_training_mode_applies_dropout(make_checkpoint, tmp_path):
    model, tokenizer = load(make_checkpoint(seed=1, dropout=0.0, attention_dropout=0.0))
    apply_lora(model, lora_config(model, dropout=0.5))
    for _, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            layer.lora_B = mx.ones_like(layer.lora_B)
    eval_logits = logits(model)
    model.train()
    assert np.abs(logits(model) - eval_logits).max() > 1e-3
    model.eval()
    assert np.array_equal(logits(model), eval_logits)


def test_qlora_trains_on_a_4bit_copy(tiny_checkpoint, text_data, tmp_path):
    convert(tiny_checkpoint, tmp_path / "q4", quantize=True, q_bits=4, verbose=False)
    model, tokenizer = load(tmp_path / "q4")
    apply_lora(model, lora_config(model))
    base = model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base, nn.QuantizedLinear)
    frozen = np.array(base.weight)
    data = load_dataset(text_data, tokenizer)
    before = evaluate(model, data["train"], 4)
    train(
        model,
        data["train"],
        data["valid"],
        TrainingArgs(iters=30, learning_rate=1e-2, val_batches=0),
        save=print,
    )
    assert evaluate(model, data["train"], 4) < 0.5 * before
    assert np.array_equal(np.array(base.weight), frozen)
    assert model.layers[0].self_attn.q_proj.lora_B.dtype == mx.float32


def test_mask_prompt_scores_only_the_completion(tiny_checkpoint, tmp_path):
    _, tokenizer = load(tiny_checkpoint)
    data_folder(tmp_path, kind="prompt")
    plain = load_dataset(tmp_path, tokenizer)["train"]
    masked = load_dataset(tmp_path, tokenizer, mask_prompt=True)["train"]
    example = masked[0]
    completion = tokenizer.encode(" The answer is 1.", add_special_tokens=False)
    assert example.ids == tokenizer.encode("Question 0: what comes after 0?") + completion + [2]
    (_, all_labels), (_, masked_labels) = (
        next(iterate_batches(d, 16, m)) for d, m in ((plain, False), (masked, True))
    )
    row = [ids for ids in np.array(masked_labels) if (ids != -100).sum() == len(completion) + 1]
    assert row, "a masked row counts exactly its completion and the closing </s>"
    assert (np.array(masked_labels) != -100).sum() < (np.array(all_labels) != -100).sum()


def test_mask_prompt_changes_what_training_learns(tiny_checkpoint, tmp_path):
    model, tokenizer = load(tiny_checkpoint)
    data_folder(tmp_path, kind="prompt")
    losses = []
    for mask in (False, True):
        rows = load_dataset(tmp_path, tokenizer, mask_prompt=mask)["valid"]
        losses.append(evaluate(model, rows, 4, mask_prompt=mask))
    assert abs(losses[0] - losses[1]) > 1e-3


def test_resume_continues_from_a_saved_adapter(tiny_checkpoint, text_data, trained, tmp_path):
    model, tokenizer = load(tiny_checkpoint, adapter_path=trained)
    valid = load_dataset(text_data, tokenizer)["valid"]
    saved_loss = evaluate(model, valid, 4)
    fresh, _ = load(tiny_checkpoint)
    mx.random.seed(123)
    config = lora_config(fresh, target_modules=["q_proj", "v_proj", "fc2"], num_layers=1)
    apply_lora(fresh, config)
    assert abs(evaluate(fresh, valid, 4) - saved_loss) > 1e-3
    resume_adapter(fresh, read_adapter_weights(trained / "adapter_model.safetensors"), "saved")
    assert evaluate(fresh, valid, 4) == pytest.approx(saved_loss, abs=1e-6)
    updates = []
    args = TrainingArgs(iters=4, learning_rate=1e-2, val_batches=-1)
    train(
        fresh,
        load_dataset(text_data, tokenizer)["train"],
        valid,
        args,
        save=lambda it: None,
        callback=updates.append,
    )
    val = [u.val_loss for u in updates if u.kind == "val"]
    assert val[0] == pytest.approx(saved_loss, abs=1e-5)


def test_resume_needs_the_same_modules(tiny_checkpoint, trained):
    model, _ = load(tiny_checkpoint)
    apply_lora(model, lora_config(model, target_modules=["q_proj"]))
    with pytest.raises(XGLMError, match="adapts other modules") as e:
        resume_adapter(model, read_adapter_weights(trained), str(trained))
    assert e.value.param == "resume_adapter_file"


def test_adapter_files_are_peft_named(trained):
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (8, 16.0, False)
    assert config["target_modules"] == ["q_proj", "v_proj", "fc2"] and config["layers_to_transform"] == [1]
    names = set(mx.load(str(trained / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.1.fc2.lora_B.weight" in names and len(names) == 6


def test_saved_adapter_reloads_exactly(tiny_checkpoint, trained, tmp_path):
    model, _ = load(tiny_checkpoint, adapter_path=trained)
    save_adapter(
        model, tmp_path, lora_config(model, target_modules=["q_proj", "v_proj", "fc2"], num_layers=1)
    )
    again, _ = load(tiny_checkpoint, adapter_path=tmp_path)
    assert np.array_equal(logits(again), logits(model))


def test_fused_model_equals_model_with_adapter(tiny_checkpoint, trained, tmp_path):
    with_adapter, _ = load(tiny_checkpoint, adapter_path=trained)
    base, _ = load(tiny_checkpoint)
    fused_path = fuse(tiny_checkpoint, trained, tmp_path / "fused")
    fused, _ = load(fused_path)
    assert np.abs(logits(fused) - logits(with_adapter)).max() < 1e-4
    assert np.abs(logits(fused) - logits(base)).max() > 1e-2
    card = (fused_path / "README.md").read_text()
    assert str(trained) in card and "LoRA adapter" in card
    with pytest.raises(XGLMError, match="already exists"):
        fuse(tiny_checkpoint, trained, fused_path)


def test_fusing_into_a_quantized_model_keeps_the_adapter(tiny_checkpoint, trained, tmp_path):
    convert(tiny_checkpoint, tmp_path / "q8", quantize=True, q_bits=8, verbose=False)
    with_adapter, _ = load(tmp_path / "q8", adapter_path=trained)
    base, _ = load(tmp_path / "q8")
    kept = fuse(tmp_path / "q8", trained, tmp_path / "fused-q8")
    assert json.loads((kept / "config.json").read_text())["quantization"]["bits"] == 8
    floats = fuse(tmp_path / "q8", trained, tmp_path / "fused-f", dequantize=True)
    assert "quantization" not in json.loads((floats / "config.json").read_text())
    target, moved = logits(with_adapter), np.abs(logits(with_adapter) - logits(base)).max()
    assert np.abs(logits(load(floats)[0]) - target).max() < 1e-4
    # Fusing into 8-bit weights re-quantizes them, measured: 0.065 off while the adapter moves the
    # logits by 74.0 (0.088%); bound 2.8x that.
    assert np.abs(logits(load(kept)[0]) - target).max() < 0.0025 * moved


def test_bad_lora_settings_name_their_parameter(tiny_checkpoint):
    model, _ = load(tiny_checkpoint)
    cases = [
        ({"num_layers": 3}, "num_layers", "more than the model's 2 layers"),
        ({"num_layers": 0}, "num_layers", r"-1 \(all\) or 1\.\.2"),
        ({"target_modules": ["q_proj", "gate_proj"]}, "target_modules", "gate_proj does not exist"),
        ({"rank": 0}, "rank", "rank must be 1 or more"),
        ({"dropout": 1.0}, "dropout", "dropout must be in"),
    ]
    for options, param, text in cases:
        with pytest.raises(XGLMError, match=text) as e:
            lora_config(model, **options)
        assert e.value.param == param


def test_adapter_for_another_model_shape_is_refused(make_checkpoint, trained):
    other = make_checkpoint(seed=2, d_model=32, attention_heads=4)
    with pytest.raises(
        XGLMError, match=r"layers\.1\.fc2\.lora_B\.weight has shape \(64, 8\), this model needs \(32, 8\)"
    ):
        load(other, adapter_path=trained)
    deeper = make_checkpoint(seed=2, num_layers=1)
    with pytest.raises(XGLMError, match=r"adapter module model\.layers\.1\.fc2 does not exist"):
        load(deeper, adapter_path=trained)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "fine"}\n{"text": broken}\n', r"train\.jsonl:2: not valid JSON"),
        ('{"text": "fine"}\n\n[1, 2]\n', r"train\.jsonl:3: a row must be a JSON object"),
        ('{"question": "no text"}\n', r'train\.jsonl:1: a row needs a string "text"'),
        ("\n\n", r"train\.jsonl holds no rows"),
    ],
)
def test_bad_data_names_file_and_line(tiny_checkpoint, tmp_path, content, message):
    _, tokenizer = load(tiny_checkpoint)
    data_folder(tmp_path)
    (tmp_path / "train.jsonl").write_text(content)
    with pytest.raises(XGLMError, match=message):
        load_dataset(tmp_path, tokenizer)


def test_missing_split_and_text_rows_with_mask_prompt(tiny_checkpoint, tmp_path):
    _, tokenizer = load(tiny_checkpoint)
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    with pytest.raises(XGLMError, match=r"valid\.jsonl not found"):
        load_dataset(tmp_path, tokenizer)
    write_jsonl(tmp_path / "valid.jsonl", [{"text": "a"}])
    with pytest.raises(XGLMError, match=r"train\.jsonl:1: mask_prompt needs") as e:
        load_dataset(tmp_path, tokenizer, mask_prompt=True)
    assert e.value.param == "mask_prompt"


def test_rows_are_truncated_to_max_seq_length(tiny_checkpoint, tmp_path):
    _, tokenizer = load(tiny_checkpoint)
    data_folder(tmp_path, kind="prompt")
    rows = load_dataset(tmp_path, tokenizer, max_seq_length=6)["train"]
    assert max(len(r.ids) for r in rows) == 6
    with pytest.raises(XGLMError, match="nothing left to learn") as e:
        load_dataset(tmp_path, tokenizer, mask_prompt=True, max_seq_length=6)
    assert e.value.param == "max_seq_length"
