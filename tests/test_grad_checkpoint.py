"""Gradient checkpointing: with every dropout on, the gradients equal those of the plain backward pass."""

from __future__ import annotations

import contextlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from lora_fixtures import data_folder
from mlx.utils import tree_flatten

from mlx_xglm import load
from mlx_xglm.model import dropout
from mlx_xglm.tuning import LoRALinear, TrainingArgs, apply_lora, load_dataset, lora_config, train

IDS = mx.array([[2, 100, 200, 300, 400, 500, 17, 33, 9, 41], [2, 7, 8, 9, 10, 11, 12, 13, 14, 15]])
RATES = {"dropout": 0.3, "attention_dropout": 0.3, "activation_dropout": 0.3}


@pytest.fixture(scope="module")
def model(make_checkpoint):
    """Four layers, every model dropout and layerdrop on, LoRA (dropout 0.3) with nonzero lora_B."""
    model, _ = load(make_checkpoint(seed=4, num_layers=4, layerdrop=0.3, **RATES))
    apply_lora(model, lora_config(model, dropout=0.3))
    mx.random.seed(1)
    for _, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            layer.lora_B = 0.1 * mx.random.normal(layer.lora_B.shape)
    return model


def loss_fn(model, ids):
    return model.forward(input_ids=ids, labels=ids).loss


def gradients(model, checkpoint: bool, seed: int = 7) -> tuple[float, dict]:
    model.train()
    model.model.grad_checkpoint = checkpoint
    try:
        mx.random.seed(seed)
        loss, grads = nn.value_and_grad(model, loss_fn)(model, IDS)
        mx.eval(loss, grads)
    finally:
        model.model.grad_checkpoint = False
        model.eval()
    return loss.item(), {k: np.array(v) for k, v in tree_flatten(grads)}


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) == 4 * 6 * 2  # lora_A, lora_B of 6 Linears in 4 layers
    return max(np.abs(a[k] - b[k]).max() for k in a)


def test_checkpointed_gradients_equal_plain_ones_with_dropout_on(model):
    loss, plain = gradients(model, checkpoint=False)
    loss_ckpt, ckpt = gradients(model, checkpoint=True)
    assert loss_ckpt == loss
    assert largest_difference(plain, ckpt) <= 1e-5
    # The comparison has teeth: another seed draws other masks, and other gradients.
    assert largest_difference(plain, gradients(model, checkpoint=False, seed=8)[1]) > 1e-3


def test_redrawn_masks_would_be_caught(model, monkeypatch):
    """A naive checkpoint (dropout from the global generator, redrawn in the rerun) fails the comparison."""
    loss, plain = gradients(model, checkpoint=False)
    monkeypatch.setattr(dropout, "dropout_key", lambda key: contextlib.nullcontext())
    loss_naive, naive = gradients(model, checkpoint=True)
    assert largest_difference(plain, naive) > 1e-3


def test_layer_dropout_masks_follow_the_key(model):
    """Plain training-mode passes: one seed, one set of masks; eval mode is untouched by the option."""
    model.train()
    runs = []
    for seed in (3, 3, 4):
        mx.random.seed(seed)
        runs.append(np.array(model(IDS)))
    model.eval()
    assert np.array_equal(runs[0], runs[1]) and np.abs(runs[0] - runs[2]).max() > 1e-3
    eval_logits = np.array(model(IDS))
    model.model.grad_checkpoint = True
    try:
        assert np.array_equal(np.array(model(IDS)), eval_logits)
    finally:
        model.model.grad_checkpoint = False


def test_training_with_grad_checkpoint_trains_the_same_adapter(make_checkpoint, tmp_path):
    checkpoint = make_checkpoint(seed=5, **RATES)
    data = data_folder(tmp_path / "data")
    adapters, seen = [], []
    for checkpoint_layers in (False, True):
        model, tokenizer = load(checkpoint)
        mx.random.seed(0)
        apply_lora(model, lora_config(model, dropout=0.2))
        splits = load_dataset(data, tokenizer)
        args = TrainingArgs(iters=4, learning_rate=1e-2, val_batches=0, grad_checkpoint=checkpoint_layers)
        train(
            model,
            splits["train"],
            splits["valid"],
            args,
            save=lambda it: None,
            callback=lambda update, model=model: seen.append((update.kind, model.model.grad_checkpoint)),
        )
        adapters.append({k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())})
        assert model.model.grad_checkpoint is False  # the option lasts for the run only
    assert [on for kind, on in seen if kind == "step"] == [False] * 4 + [True] * 4
    assert max(np.abs(adapters[0][k] - adapters[1][k]).max() for k in adapters[0]) <= 1e-5
