"""KV caches: the rotating window, trimming, and prompt-cache files."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_xglm import (
    XGLMError,
    can_trim_prompt_cache,
    generate_step,
    load,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)
from mlx_xglm.decoding import cached_tokens, prompt_cache_max_kv_size
from mlx_xglm.model.cache import KVCache, RotatingKVCache

TEXT = "The quick brown fox jumps over the lazy dog. Москва является столицей России. 敏捷的棕色狐狸"


@pytest.fixture(scope="module")
def model_and_tokenizer(lively_checkpoint):
    return load(lively_checkpoint)


def window_logits(model, ids, window):
    """A full forward where each query sees only the `window` most recent positions, itself included."""
    pos = mx.arange(ids.size)
    band = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - window)
    return np.array(model(ids[None], mask=band))


def test_make_prompt_cache_picks_the_cache_type(model_and_tokenizer):
    model, _ = model_and_tokenizer
    assert all(type(c) is KVCache for c in make_prompt_cache(model))
    rotating = make_prompt_cache(model, max_kv_size=8)
    assert len(rotating) == len(model.layers)
    assert all(isinstance(c, RotatingKVCache) and c.max_size == 8 for c in rotating)


def test_rotating_cache_equals_full_forward_within_its_window(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = mx.array(tokenizer.encode("The quick brown fox"))
    cache = make_prompt_cache(model, max_kv_size=64)
    steps = [np.array(model(ids[i : i + 1][None], cache=cache)) for i in range(ids.size)]
    assert np.abs(np.concatenate(steps, axis=1) - np.array(model(ids[None]))).max() <= 1e-5


@pytest.mark.parametrize("chunk", [1, 3, 8, 13])
def test_rotating_cache_attends_over_the_last_max_kv_size_positions(model_and_tokenizer, chunk):
    model, tokenizer = model_and_tokenizer
    ids = mx.array(tokenizer.encode(TEXT))
    window = 8
    assert ids.size > 3 * window
    cache = make_prompt_cache(model, max_kv_size=window)
    out = [np.array(model(ids[i : i + chunk][None], cache=cache)) for i in range(0, ids.size, chunk)]
    assert np.abs(np.concatenate(out, axis=1) - window_logits(model, ids, window)).max() <= 1e-4
    # Positions keep counting while the kept keys stay at the window size.
    assert cache[0].offset == ids.size
    assert cache[0].state[0].shape[2] == window


def test_rotating_cache_memory_stays_bounded_over_a_long_run(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    cache = make_prompt_cache(model, max_kv_size=16)
    sizes = []
    for n, _ in enumerate(
        generate_step(mx.array(tokenizer.encode(TEXT)), model, max_tokens=300, prompt_cache=cache)
    ):
        if n % 50 == 49:
            sizes.append((sum(c.nbytes for c in cache), cache[0].keys.shape))
    assert cache[0].offset > 300
    assert len(set(sizes)) == 1
    heads, head_dim = model.config.attention_heads, model.config.head_dim
    assert sizes[0][1] == (1, heads, 16, head_dim)


def test_generation_with_max_kv_size_differs_from_full_attention_only_past_the_window(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = mx.array(tokenizer.encode("Le renard"))
    full = [t for t, _ in generate_step(prompt, model, max_tokens=30)]
    windowed = [t for t, _ in generate_step(prompt, model, max_tokens=30, max_kv_size=16)]
    # Token k comes from the query at position prompt.size - 1 + k, which sees k + prompt.size positions:
    # while those fit in the window the two are the same computation, after that they part.
    fits = 16 - prompt.size + 1
    assert windowed[:fits] == full[:fits]
    assert windowed[fits:] != full[fits:]


def test_kv_cache_trim_drops_the_last_positions(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = mx.array(tokenizer.encode(TEXT))
    cache = make_prompt_cache(model)
    model(ids[None], cache=cache)
    assert can_trim_prompt_cache(cache)
    assert trim_prompt_cache(cache, 5) == 5
    assert cached_tokens(cache) == ids.size - 5 and all(c.offset == ids.size - 5 for c in cache)
    next_logits = np.array(model(ids[-5:][None], cache=cache))
    assert np.abs(next_logits - np.array(model(ids[None]))[:, -5:]).max() <= 1e-5


def test_rotating_cache_trims_only_before_it_wraps():
    cache = RotatingKVCache(4)
    cache.update_and_fetch(mx.zeros((1, 2, 3, 8)), mx.zeros((1, 2, 3, 8)))
    assert cache.is_trimmable() and cache.trim(1) == 1 and cache.offset == 2
    cache.update_and_fetch(mx.zeros((1, 2, 5, 8)), mx.zeros((1, 2, 5, 8)))
    assert not cache.is_trimmable() and cache.trim(1) == 0 and cache.offset == 7


def test_a_wrapped_rotating_prompt_cache_is_left_whole(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    cache = make_prompt_cache(model, max_kv_size=8)
    model(mx.array([tokenizer.encode(TEXT)[:12]]), cache=cache)
    assert prompt_cache_max_kv_size(cache) == 8 and prompt_cache_max_kv_size(make_prompt_cache(model)) is None
    assert not can_trim_prompt_cache(cache)
    assert trim_prompt_cache(cache, 3) == 0 and cached_tokens(cache) == 12


@pytest.mark.parametrize("meta_state", [{"offset": 0}, {"offset": 0, "max_size": 4}])
def test_from_state_rebuilds_each_cache_type(meta_state):
    kind = RotatingKVCache if "max_size" in meta_state else KVCache
    empty = kind.from_state((), meta_state)
    assert type(empty) is kind and empty.state == () and empty.meta_state == meta_state
    keys = mx.arange(2 * 3 * 6 * 5, dtype=mx.float32).reshape(2, 3, 6, 5)
    empty.update_and_fetch(keys, -keys)
    rebuilt = kind.from_state(empty.state, empty.meta_state)
    assert rebuilt.meta_state == empty.meta_state
    assert all(mx.array_equal(a, b).item() for a, b in zip(rebuilt.state, empty.state, strict=True))


def test_max_kv_size_must_be_positive():
    with pytest.raises(XGLMError, match="max_kv_size") as error:
        RotatingKVCache(0)
    assert error.value.param == "max_kv_size"


@pytest.mark.parametrize("max_kv_size", [None, 12])
def test_saved_prompt_cache_continues_like_one_uninterrupted_run(model_and_tokenizer, tmp_path, max_kv_size):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer.encode(TEXT)
    prefix, rest = mx.array(ids[:20]), mx.array(ids[20:])
    whole = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=24, max_kv_size=max_kv_size)]

    cache = make_prompt_cache(model, max_kv_size=max_kv_size)
    assert list(generate_step(prefix, model, max_tokens=0, prompt_cache=cache)) == []
    path = tmp_path / "prefix.safetensors"
    save_prompt_cache(path, cache, metadata={"prompt": "prefix"})
    loaded, metadata = load_prompt_cache(path, return_metadata=True)
    assert metadata == {"prompt": "prefix"}
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    assert loaded[0].offset == 20
    resumed = [t for t, _ in generate_step(rest, model, max_tokens=24, prompt_cache=loaded)]
    assert resumed == whole


def test_save_prompt_cache_leaves_no_temporary_files(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    cache = make_prompt_cache(model)
    model(mx.array([tokenizer.encode("hello")]), cache=cache)
    save_prompt_cache(tmp_path / "c.safetensors", cache)
    save_prompt_cache(tmp_path / "c.safetensors", cache)
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]
    assert load_prompt_cache(tmp_path / "c.safetensors")[0].offset == len(tokenizer.encode("hello"))


def test_prompt_cache_of_another_model_shape_is_a_clear_error(model_and_tokenizer, make_checkpoint, tmp_path):
    model, tokenizer = model_and_tokenizer
    cache = make_prompt_cache(model)
    prompt = mx.array(tokenizer.encode("hello"))
    list(generate_step(prompt, model, max_tokens=0, prompt_cache=cache))
    save_prompt_cache(tmp_path / "c.safetensors", cache)
    for other in (
        make_checkpoint(seed=1, attention_heads=8, ffn_dim=256),
        make_checkpoint(seed=1, num_layers=3),
    ):
        other_model, _ = load(other)
        with pytest.raises(XGLMError, match="prompt cache"):
            list(
                generate_step(prompt, other_model, prompt_cache=load_prompt_cache(tmp_path / "c.safetensors"))
            )


def test_missing_or_foreign_prompt_cache_file_is_a_clear_error(tmp_path):
    with pytest.raises(XGLMError, match="not found"):
        load_prompt_cache(tmp_path / "nope.safetensors")
    mx.save_safetensors(str(tmp_path / "w.safetensors"), {"x": mx.zeros(2)})
    with pytest.raises(XGLMError, match="save_prompt_cache"):
        load_prompt_cache(tmp_path / "w.safetensors")
