"""The decoding fast path: fused q/k/v projections, transposed weight views, compiled layer halves and the
whole compiled decoding step give the model's own numbers."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_xglm import generate_step, load
from mlx_xglm.checkpoints.quantize import mixed_recipe, quant_settings, quantization_plan
from mlx_xglm.model import compiled as compiling_module
from mlx_xglm.model.fused import fuse_qkv, layer_norm

PROMPT = mx.array([2, 100, 200, 300, 17, 5, 41, 77, 9, 250])


def unfused(model):
    """A copy of `model` with separate projections."""
    copy = type(model)(model.config)
    if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        nn.quantize(copy, class_predicate=lambda path, m: _settings(model, path))
    copy.update(model.parameters())
    copy.eval()
    return copy


def _settings(model, path):
    module = dict(model.named_modules()).get(path)
    if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return False
    return {"group_size": module.group_size, "bits": module.bits, "mode": module.mode}


def decode(model, steps=6):
    """Logits of a prompt read at once, then of `steps` single-token steps."""
    cache = model.make_cache()
    out = [model(PROMPT[None], cache=cache)]
    y = mx.argmax(out[-1][:, -1], axis=-1)
    for _ in range(steps):
        out.append(model(y[None], cache=cache))
        y = mx.argmax(out[-1][:, -1], axis=-1)
    return out


def assert_same(a, b, atol=1e-4):
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape and mx.allclose(x, y, atol=atol).item(), mx.abs(x - y).max()


@pytest.fixture
def model(lively_checkpoint):
    return load(lively_checkpoint)[0]


def test_load_fuses_every_layer_without_changing_the_parameters(model):
    plain = unfused(model)
    assert all("_qkv_weight" in layer.self_attn for layer in model.layers)
    names = dict(tree_flatten(model.parameters()))
    assert names.keys() == dict(tree_flatten(plain.parameters())).keys()
    assert all(mx.array_equal(v, dict(tree_flatten(plain.parameters()))[k]).item() for k, v in names.items())
    assert_same(decode(model), decode(plain))


def test_fused_model_saves_the_checkpoint_names(model, tmp_path):
    model.save_weights(str(tmp_path / "w.safetensors"))
    saved = mx.load(str(tmp_path / "w.safetensors"))
    assert not any("qkv" in name for name in saved)
    assert mx.array_equal(
        saved["model.layers.0.self_attn.k_proj.weight"], model.layers[0].self_attn.k_proj.weight
    )


def test_quantized_projections_of_one_format_fuse(model):
    nn.quantize(model, group_size=32, bits=4)
    assert fuse_qkv(model) == len(model.layers)
    assert_same(decode(model), decode(unfused(model)))


def test_a_recipe_giving_v_proj_more_bits_leaves_those_layers_separate(model):
    recipe = mixed_recipe(3, 6, len(model.layers), group_size=32)
    plan = quantization_plan(model, quant_settings(3, 32), recipe)
    nn.quantize(model, class_predicate=lambda path, module: plan.get(path, False))
    # mixed_recipe gives v_proj more bits in the first and last layer of a 2-layer model.
    assert fuse_qkv(model) == 0
    assert_same(decode(model), decode(unfused(model)))


def test_new_weights_replace_the_fused_projection(model):
    plain = unfused(model)
    new = {
        "model": {
            "layers": [
                {"self_attn": {"v_proj": {"weight": mx.ones_like(layer.self_attn.v_proj.weight)}}}
                for layer in model.layers
            ]
        }
    }
    model.update(new)
    plain.update(new)
    assert_same(decode(model), decode(plain))
    assert not any("_qkv_weight" in layer.self_attn for layer in model.layers)


@pytest.mark.parametrize("compiled", [False, True])
def test_new_weights_replace_the_transposed_views(model, compiled, monkeypatch):
    compiling(monkeypatch, on=compiled)
    plain = unfused(model)
    decode(model)
    assert all("_weight_t" in layer.fc1 for layer in model.layers)
    new = {"model": {"layers": [{"fc1": {"bias": mx.ones_like(layer.fc1.bias)}} for layer in model.layers]}}
    model.update(new)
    plain.update(new)
    assert_same(decode(model), decode(plain))
    assert not any("_weight_t" in layer.fc1 for layer in model.layers)
    assert all("_weight_t" in layer.fc2 for layer in model.layers)


def test_a_projection_wrapped_in_an_adapter_is_not_fused(model):
    class Adapter(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear
            self.extra = mx.ones((linear.weight.shape[0],))

        def __call__(self, x):
            return self.linear(x) + self.extra

    expected = decode(model)
    for layer in model.layers:
        layer.self_attn.q_proj = Adapter(layer.self_attn.q_proj)
    changed = decode(model)
    assert not mx.allclose(changed[0], expected[0]).item()
    assert fuse_qkv(model) == 0


def compiling(monkeypatch, on=True, whole_step=True):
    # Compiling is on by default on GPUs only; force it here, whatever the device.
    monkeypatch.setattr(compiling_module, "COMPILES", on)
    monkeypatch.setattr(compiling_module, "COMPILE_STEP", on and whole_step)
    monkeypatch.setattr(compiling_module, "COMPILE_MAX_LENGTH", 8 if on else 0)


def written_steps(model, monkeypatch, prompt=PROMPT, max_tokens=20):
    compiling(monkeypatch, on=False)
    return list(generate_step(prompt, unfused(model), max_tokens=max_tokens))


def assert_same_steps(got, want):
    assert [t for t, _ in got] == [t for t, _ in want]
    assert_same([lp for _, lp in got], [lp for _, lp in want])


def test_compiled_halves_give_the_tokens_and_logprobs_of_the_model_as_written(model, monkeypatch):
    compiling(monkeypatch, whole_step=False)
    compiled = list(generate_step(PROMPT, model, max_tokens=20))
    assert not hasattr(model, "_decode_step")
    assert_same_steps(compiled, written_steps(model, monkeypatch))


def test_the_whole_compiled_step_gives_the_tokens_and_logprobs_of_the_model_as_written(model, monkeypatch):
    compiling(monkeypatch)
    compiled = list(generate_step(PROMPT, model, max_tokens=20))
    assert model._decode_step.valid()
    assert_same_steps(compiled, written_steps(model, monkeypatch))


def test_the_compiled_step_goes_on_when_the_cache_grows(model, monkeypatch):
    # A 250-token prompt fills the first 256 preallocated positions after 6 steps: the buffers grow and
    # the step is traced again for the new size.
    prompt = mx.array([2] + [(7 * i) % 250 + 4 for i in range(249)])
    compiling(monkeypatch)
    compiled = list(generate_step(prompt, model, max_tokens=12))
    assert_same_steps(compiled, written_steps(model, monkeypatch, prompt, 12))


def test_the_compiled_step_reads_nothing_past_a_trimmed_cache(model, monkeypatch):
    compiling(monkeypatch)
    cache = model.make_cache()
    model(PROMPT[None], cache=cache)
    for token in (5, 6, 7):
        model(mx.array([[token]]), cache=cache)
    for c in cache:
        c.trim(3)
    trimmed = model(mx.array([[9]]), cache=cache)
    fresh = model.make_cache()
    model(PROMPT[None], cache=fresh)
    assert_same([trimmed], [model(mx.array([[9]]), cache=fresh)])
    assert cache[0].offset == fresh[0].offset == len(PROMPT) + 1


def test_the_compiled_step_decodes_rows_of_a_batch(model, monkeypatch):
    prompts = mx.array([[2, 100, 200, 300], [2, 17, 5, 41]])
    outputs = []
    for on in (True, False):
        compiling(monkeypatch, on=on)
        cache = model.make_cache()
        y = mx.argmax(model(prompts, cache=cache)[:, -1], axis=-1)
        steps = []
        for _ in range(4):
            steps.append(model(y[:, None], cache=cache))
            y = mx.argmax(steps[-1][:, -1], axis=-1)
        outputs.append(steps)
    assert_same(*outputs)


def test_the_compiled_step_of_a_quantized_float16_model(model, monkeypatch):
    model.set_dtype(mx.float16)
    nn.quantize(model, group_size=32, bits=8)
    fuse_qkv(model)
    compiling(monkeypatch)
    compiled = list(generate_step(PROMPT, model, max_tokens=10))
    assert_same_steps(compiled, written_steps(model, monkeypatch, max_tokens=10))


@pytest.mark.parametrize("compiled", [False, True])
def test_training_after_decoding_gets_the_gradients_of_a_fresh_model(
    model, lively_checkpoint, compiled, monkeypatch
):
    compiling(monkeypatch, on=compiled)
    decode(model)
    fresh = unfused(load(lively_checkpoint)[0])
    tokens = PROMPT[None]

    def loss(m):
        return m.forward(tokens, labels=tokens).loss

    model.train()
    fresh.train()
    # The same seed draws the same dropout masks for both.
    mx.random.seed(0)
    got = nn.value_and_grad(model, loss)(model)
    mx.random.seed(0)
    want = nn.value_and_grad(fresh, loss)(fresh)
    assert mx.allclose(got[0], want[0], atol=1e-5).item()
    grads, expected = dict(tree_flatten(got[1])), dict(tree_flatten(want[1]))
    assert grads.keys() == expected.keys()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.fc2.weight"):
        assert mx.allclose(grads[name], expected[name], atol=1e-4).item(), name


def test_float16_positions_are_cast_once(model):
    model.set_dtype(mx.float16)
    fuse_qkv(model)
    decode(model, steps=2)
    positions = model.model.embed_positions
    cast = positions._cast
    decode(model, steps=2)
    assert positions._cast is cast and cast.dtype == mx.float16


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("width", [64, 1024, 1000])
def test_the_spelled_out_layer_norm_equals_the_module(dtype, width):
    norm = nn.LayerNorm(width)
    norm.update(
        {"weight": mx.random.normal((width,)).astype(dtype), "bias": mx.random.normal((width,)).astype(dtype)}
    )
    x = (mx.random.normal((3, width)) * 20 + 5).astype(dtype)
    want = norm(x)
    for got in (layer_norm(norm, x), mx.compile(lambda x: layer_norm(norm, x))(x)):
        assert got.dtype == want.dtype and mx.array_equal(got, want).item()
