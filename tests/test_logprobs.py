"""model/logprobs.py: the chunked log-softmax and cross-entropy every scorer and the loss go through.

Checked against the straightforward MLX computation (the whole logits, `mx.logsumexp`, MLX's autodiff),
against finite differences, across chunk boundaries, with ignored labels, untied, LoRA-wrapped, quantized
and float16 heads, and on both routes (numpy on the CPU, MLX's ops as on Metal and CUDA).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_xglm.checkpoints.quantize import quantize_model
from mlx_xglm.model import XGLMConfig, XGLMForCausalLM, causal_lm_loss, logprobs
from mlx_xglm.model.lora import LoRALinear

CONFIG = dict(vocab_size=300, d_model=64, ffn_dim=128, num_layers=2, attention_heads=4, dropout=0.0)
CONFIG.update(attention_dropout=0.0, max_position_embeddings=64)
IDS = [[2, 17, 5, 299, 42, 8, 8, 100, 3], [2, 250, 7, 1, 1, 64, 9, 11, 12]]
LABELS = [[2, 17, 5, 299, -100, 8, 8, 100, 3], [-100, -100, 7, 1, 1, 64, -100, 11, -100]]


def make_model(dtype=mx.float32, **overrides) -> XGLMForCausalLM:
    mx.random.seed(0)
    model = XGLMForCausalLM(XGLMConfig(**{**CONFIG, **overrides}))
    # Larger weights than the default init, so the softmax is far from uniform.
    model.update(tree_map(lambda w: w * 4, model.parameters()))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def reference_loss(model, ids, labels, num_items_in_batch=None):
    """Today's loss before model/logprobs.py: the whole logits, float32, mx.logsumexp, MLX's autodiff."""
    logits = model(mx.array(ids)).astype(mx.float32)
    labels = mx.array(labels)
    targets = mx.concatenate([labels[:, 1:], mx.full((labels.shape[0], 1), -100)], axis=1)
    counted = targets != -100
    picked = mx.take_along_axis(logits, mx.where(counted, targets, 0)[..., None], axis=-1)[..., 0]
    nll = mx.where(counted, mx.logsumexp(logits, axis=-1) - picked, 0.0)
    return nll.sum() / (counted.sum() if num_items_in_batch is None else num_items_in_batch)


def ours(model, ids, labels, num_items_in_batch=None):
    return model.forward(input_ids=ids, labels=labels, num_items_in_batch=num_items_in_batch).loss


def assert_close_grads(got, want, tolerance):
    got, want = dict(tree_flatten(got)), dict(tree_flatten(want))
    assert got.keys() == want.keys()
    for name, g in got.items():
        g, w = np.array(g, np.float32), np.array(want[name], np.float32)
        assert np.abs(g - w).max() <= tolerance * max(np.abs(w).max(), 1.0), name


@pytest.fixture(params=["cpu numpy", "mlx ops"])
def route(request, monkeypatch):
    """Both routes of the softmax: numpy on the CPU, and MLX's ops as on Metal and CUDA."""
    if request.param == "mlx ops":
        monkeypatch.setattr(logprobs, "_on_cpu", lambda: False)
    return request.param


@pytest.mark.parametrize("chunk", [256, 4, 5])
@pytest.mark.parametrize("training", [True, False])
def test_loss_and_gradients_equal_the_whole_logits_computation(route, monkeypatch, chunk, training):
    monkeypatch.setattr(logprobs, "CHUNK", chunk)
    model = make_model()
    model.train(training)
    loss, grads = nn.value_and_grad(model, ours)(model, IDS, LABELS)
    want, want_grads = nn.value_and_grad(model, reference_loss)(model, IDS, LABELS)
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    assert_close_grads(grads, want_grads, 1e-5)


def test_num_items_in_batch_divides_the_sum(route):
    model = make_model()
    loss, grads = nn.value_and_grad(model, ours)(model, IDS, LABELS, 40)
    want, want_grads = nn.value_and_grad(model, reference_loss)(model, IDS, LABELS, 40)
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    assert_close_grads(grads, want_grads, 1e-5)


def test_gradient_agrees_with_finite_differences(route):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 6, 50)).astype(np.float32)
    labels = rng.integers(0, 50, (2, 6))
    labels[0, 3] = -100
    grad = np.array(mx.grad(lambda x: causal_lm_loss(x, labels))(mx.array(logits)))
    eps = 1e-2
    for index in [(0, 0, 7), (0, 1, int(labels[0, 2])), (1, 4, int(labels[1, 5])), (1, 3, 3), (0, 4, 49)]:
        up, down = logits.copy(), logits.copy()
        up[index] += eps
        down[index] -= eps
        slope = causal_lm_loss(mx.array(up), labels).item() - causal_lm_loss(mx.array(down), labels).item()
        assert abs(slope / (2 * eps) - grad[index]) <= 2e-3 * max(abs(grad[index]), 1e-2), index
    # The last position and the ignored label's position score nothing.
    assert not grad[:, -1].any() and not grad[0, 2].any()


def test_untied_head_with_lora_gets_its_gradient(route):
    model = make_model(tie_word_embeddings=False)
    model.freeze()
    model.lm_head = LoRALinear(model.lm_head, r=4, scaling=2.0)
    model.lm_head.lora_B = mx.random.normal(model.lm_head.lora_B.shape) * 0.1
    model.train()
    loss, grads = nn.value_and_grad(model, ours)(model, IDS, LABELS)
    want, want_grads = nn.value_and_grad(model, reference_loss)(model, IDS, LABELS)
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    assert set(dict(tree_flatten(grads))) == {"lm_head.lora_A", "lm_head.lora_B"}
    assert_close_grads(grads, want_grads, 1e-5)


def test_quantized_tied_head_trains_the_layers_beneath(route):
    model = make_model()
    quantize_model(model, 4, 32)
    model.freeze()
    model.unfreeze(keys=["bias"])
    model.train()
    loss, grads = nn.value_and_grad(model, ours)(model, IDS, LABELS)
    want, want_grads = nn.value_and_grad(model, reference_loss)(model, IDS, LABELS)
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    assert_close_grads(grads, want_grads, 1e-5)


def test_float16_model_scores_its_float16_logits_in_float32(route):
    model = make_model(mx.float16)
    model.train()
    loss, grads = nn.value_and_grad(model, ours)(model, IDS, LABELS)
    want, want_grads = nn.value_and_grad(model, reference_loss)(model, IDS, LABELS)
    assert loss.dtype == mx.float32
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    assert_close_grads(grads, want_grads, 1e-2)


def test_every_label_ignored_gives_nan_and_zero_gradients(route):
    model = make_model()
    loss, grads = nn.value_and_grad(model, ours)(model, IDS, [[-100] * 9] * 2)
    assert np.isnan(loss.item())
    assert all(not np.array(g).any() for _, g in tree_flatten(grads))


@pytest.mark.parametrize("chunk", [256, 3])
def test_target_logprobs_equal_the_log_softmax(route, monkeypatch, chunk):
    monkeypatch.setattr(logprobs, "CHUNK", chunk)
    model = make_model()
    hidden = model.model(mx.array(IDS)).reshape(-1, CONFIG["d_model"])
    logits = model.head(hidden)
    full = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    # Every other target is the likeliest token.
    targets = np.array(IDS).reshape(-1)
    targets[::2] = full.argmax(-1)[::2]
    targets = mx.array(targets)
    got = logprobs.target_logprobs(model.head, hidden, targets, greedy=True, top=3)
    rows = np.arange(full.shape[0])
    assert np.abs(got["logprobs"] - full[rows, np.array(targets)]).max() <= 1e-5
    assert (got["greedy"] == (full.argmax(-1) == np.array(targets))).all()
    assert got["greedy"].any() and not got["greedy"].all()
    expected_ids = np.argsort(-full, axis=-1)[:, :3]
    assert (got["top_ids"] == expected_ids).all()
    assert np.abs(got["top_logprobs"] - np.take_along_axis(full, expected_ids, -1)).max() <= 1e-5


def test_target_logprobs_of_no_rows_are_empty():
    model = make_model()
    got = logprobs.target_logprobs(model.head, mx.zeros((0, 64)), mx.zeros((0,), mx.int32), greedy=True)
    assert got["logprobs"].shape == (0,) and got["greedy"].shape == (0,) and "top_ids" not in got
