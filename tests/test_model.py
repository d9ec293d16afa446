"""The MLX decoder: logits equal to transformers 4.56's XGLMForCausalLM on the same checkpoint."""

import math

import mlx.core as mx
import numpy as np
import pytest
from reference import reference_logits, reference_model

from mlx_xglm import XGLMConfig, XGLMError, XGLMForCausalLM, XGLMModel, load
from mlx_xglm.model.positions import sinusoidal_table

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Быстрая коричневая лиса, 敏捷的棕色狐狸 and القاهرة.",
]

CONFIGS = {
    "gelu-scaled": {},
    "relu-unscaled": {"activation_function": "relu", "scale_embedding": False},
    "gelu_new-3-layers-2-heads": {
        "activation_function": "gelu_new",
        "num_layers": 3,
        "attention_heads": 2,
        "d_model": 48,
        "ffn_dim": 96,
    },
    "silu-8-heads": {"activation_function": "silu", "attention_heads": 8, "ffn_dim": 256},
}


def token_ids(path, text):
    from mlx_xglm import XGLMTokenizer

    return XGLMTokenizer.from_pretrained(path).encode(text)


@pytest.mark.reference
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_reference(make_checkpoint, transformers, name):
    path = make_checkpoint(seed=len(name), **CONFIGS[name])
    model, tokenizer = load(path)
    ref = reference_model(path)
    for text in SENTENCES:
        ids = tokenizer.encode(text)
        ours = np.array(model(mx.array([ids])))
        expected = reference_logits(ref, [ids])
        assert ours.shape == expected.shape == (1, len(ids), model.config.vocab_size)
        assert np.abs(ours - expected).max() <= 1e-4


@pytest.mark.reference
def test_batched_logits_match_reference(tiny_checkpoint, transformers):
    model, tokenizer = load(tiny_checkpoint)
    ids = [tokenizer.encode("one two three four"), tokenizer.encode("Привет мир, как дела")]
    width = min(len(i) for i in ids)
    ids = [i[:width] for i in ids]
    expected = reference_logits(reference_model(tiny_checkpoint), ids)
    assert np.abs(np.array(model(mx.array(ids))) - expected).max() <= 1e-4


@pytest.mark.reference
def test_positions_past_max_position_embeddings_match_reference(make_checkpoint, transformers):
    path = make_checkpoint(seed=5, max_position_embeddings=16)
    model, tokenizer = load(path)
    ids = tokenizer.encode(" ".join(SENTENCES))
    assert len(ids) > 16 + 2
    expected = reference_logits(reference_model(path), [ids])
    assert np.abs(np.array(model(mx.array([ids]))) - expected).max() <= 1e-4


def test_cached_token_by_token_equals_full_forward(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint)
    ids = tokenizer.encode(SENTENCES[1])
    full = np.array(model(mx.array([ids])))
    cache = model.make_cache()
    steps = [np.array(model(mx.array([[i]]), cache=cache)) for i in ids]
    assert cache[0].offset == len(ids)
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= 1e-5


def test_cached_chunks_equal_full_forward(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint)
    ids = tokenizer.encode(SENTENCES[0])
    full = np.array(model(mx.array([ids])))
    cache = model.make_cache()
    first = np.array(model(mx.array([ids[:5]]), cache=cache))
    rest = np.array(model(mx.array([ids[5:]]), cache=cache))
    assert np.abs(np.concatenate([first, rest], axis=1) - full).max() <= 1e-5


def test_cache_grows_past_its_preallocated_step(tiny_checkpoint):
    model, _ = load(tiny_checkpoint)
    cache = model.make_cache()
    cache[0].step = cache[1].step = 4
    ids = list(range(4, 14))
    full = np.array(model(mx.array([ids])))
    steps = [np.array(model(mx.array([[i]]), cache=cache)) for i in ids]
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= 1e-5


def test_logits_to_keep_computes_only_the_last_positions(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint)
    ids = mx.array([tokenizer.encode(SENTENCES[0])])
    full = model(ids)
    last = model(ids, logits_to_keep=2)
    assert last.shape == (1, 2, model.config.vocab_size)
    assert mx.allclose(last, full[:, -2:], atol=1e-5).item()


def test_sinusoid_table_follows_fairseq():
    table = sinusoidal_table(10, 8, padding_idx=1)
    half = 4
    freqs = np.exp(-np.arange(half) * math.log(10000) / (half - 1))
    assert np.allclose(table[3, :half], np.sin(3 * freqs), atol=1e-6)
    assert np.allclose(table[3, half:], np.cos(3 * freqs), atol=1e-6)
    assert not table[1].any()
    assert sinusoidal_table(4, 7, padding_idx=1)[:, -1].tolist() == [0.0] * 4


def test_config_from_dict_ignores_unknown_keys():
    config = XGLMConfig.from_dict({"d_model": 32, "architectures": ["XGLMForCausalLM"], "foo": 1})
    assert config.d_model == 32
    assert config.vocab_size == 256008 and config.eos_token_id == 2 and config.scale_embedding


def test_xglm_model_returns_final_hidden_states(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint)
    ids = mx.array([tokenizer.encode("hello")])
    hidden = model.model(ids)
    assert isinstance(model.model, XGLMModel) and isinstance(model, XGLMForCausalLM)
    assert hidden.shape == (1, ids.shape[1], model.config.d_model)
    assert mx.allclose(model.model.embed_tokens.as_linear(hidden), model(ids)).item()
    assert len(model.layers) == model.config.num_layers


def test_unsupported_activation_is_rejected():
    with pytest.raises(XGLMError, match="config field activation_function must be one of gelu"):
        XGLMConfig(d_model=16, ffn_dim=16, num_layers=1, attention_heads=2, activation_function="mish")


def test_float16_positions_are_cast_once(lively_checkpoint):
    model = load(lively_checkpoint)[0]
    model.set_dtype(mx.float16)
    prompt = mx.array([[2, 100, 200, 300, 17]])
    cache = model.make_cache()
    mx.eval(model(prompt, cache=cache))
    positions = model.model.embed_positions
    cast = positions._cast
    mx.eval(model(prompt[:, :1], cache=cache))
    assert positions._cast is cast and cast.dtype == mx.float16
