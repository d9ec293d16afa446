"""Fine-tuning: the loss is differentiable, dropout and layerdrop act in training mode only."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from reference import reference_model

from mlx_xglm import load

TEXT = "The quick brown fox jumps over the lazy dog."


def loss_fn(model, ids, labels, **kwargs):
    return model.forward(input_ids=ids, labels=labels, **kwargs).loss


@pytest.mark.reference
def test_gradients_match_reference(tiny_checkpoint, transformers):
    import torch

    model, tokenizer = load(tiny_checkpoint)
    ids = mx.array([tokenizer.encode(TEXT)])
    loss, grads = nn.value_and_grad(model, loss_fn)(model, ids, ids)
    ref = reference_model(tiny_checkpoint)
    tensor = torch.tensor(np.array(ids), dtype=torch.long)
    expected = ref(tensor, labels=tensor).loss
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())
    ours = dict(tree_flatten(grads))
    theirs = dict(ref.named_parameters())
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.fc1.bias",
        "model.layer_norm.weight",
    ):
        g, t = np.array(ours[name]), theirs[name].grad.numpy()
        assert np.abs(g - t).max() <= 1e-4 * max(np.abs(t).max(), 1.0)
    # transformers' LM head is the tied embedding: its gradient gathers both uses.
    g, t = np.array(ours["model.embed_tokens.weight"]), theirs["model.embed_tokens.weight"].grad.numpy()
    assert np.abs(g - t).max() <= 1e-4 * max(np.abs(t).max(), 1.0)


def test_a_few_optimizer_steps_lower_the_loss(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint)
    ids = mx.array(
        [tokenizer.encode(TEXT)[:12], tokenizer.encode("Hello world, how are you doing today")[:12]]
    )
    before = loss_fn(model, ids, ids).item()
    model.train()
    optimizer = optim.Adam(learning_rate=1e-2)
    step = nn.value_and_grad(model, loss_fn)
    for _ in range(8):
        _, grads = step(model, ids, ids)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    model.eval()
    after = loss_fn(model, ids, ids).item()
    assert after < 0.7 * before


def test_eval_mode_is_deterministic(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint)
    ids = [tokenizer.encode(TEXT)]
    first = model.forward(input_ids=ids, labels=ids, output_attentions=True)
    second = model.forward(input_ids=ids, labels=ids, output_attentions=True)
    assert model.config.dropout > 0 and model.config.attention_dropout > 0 and not model.training
    assert np.array_equal(np.array(first.logits), np.array(second.logits))
    assert first.loss.item() == second.loss.item()


def test_train_mode_applies_dropout(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint)
    ids = [tokenizer.encode(TEXT)]
    model.train()
    first = model.forward(input_ids=ids, output_attentions=True)
    second = model.forward(input_ids=ids, output_attentions=True)
    assert not np.array_equal(np.array(first.logits), np.array(second.logits))
    # attention dropout zeroes some probabilities only in the used copy; the returned ones still sum to 1
    assert np.allclose(np.array(first.attentions[0]).sum(-1), 1.0, atol=1e-5)
    assert first.cache is None  # no cache by default while training


def test_train_mode_without_dropout_equals_eval(make_checkpoint):
    path = make_checkpoint(seed=3, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    model, tokenizer = load(path)
    ids = [tokenizer.encode(TEXT)]
    expected = np.array(model.forward(input_ids=ids).logits)
    model.train()
    assert np.abs(np.array(model.forward(input_ids=ids).logits) - expected).max() <= 1e-5


@pytest.mark.parametrize("option", ["dropout", "attention_dropout", "activation_dropout"])
def test_each_dropout_acts_in_training(make_checkpoint, option):
    rates = {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, option: 0.5}
    model, tokenizer = load(make_checkpoint(seed=4, **rates))
    ids = [tokenizer.encode(TEXT)]
    expected = np.array(model.forward(input_ids=ids).logits)
    model.train()
    assert np.abs(np.array(model.forward(input_ids=ids).logits) - expected).max() > 1e-3


def test_layerdrop_skips_layers_in_training_only(make_checkpoint):
    path = make_checkpoint(seed=6, dropout=0.0, attention_dropout=0.0, layerdrop=1.0)
    model, tokenizer = load(path)
    ids = mx.array([tokenizer.encode(TEXT)])
    out = model.forward(input_ids=ids, output_hidden_states=True, output_attentions=True)
    assert np.array_equal(np.array(out.logits), np.array(model(ids)))
    model.train()
    dropped = model.forward(input_ids=ids, output_hidden_states=True, output_attentions=True)
    assert dropped.attentions == ()
    embeddings = dropped.hidden_states[0]
    assert all(np.array_equal(np.array(h), np.array(embeddings)) for h in dropped.hidden_states[:-1])
    assert np.allclose(np.array(dropped.hidden_states[-1]), np.array(model.model.layer_norm(embeddings)))
