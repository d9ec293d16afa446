"""Quantized KV caches: closeness to the float cache, size, generation, files, and clear refusals."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_xglm import XGLMError, generate_step, load, load_prompt_cache, make_prompt_cache, save_prompt_cache
from mlx_xglm.model.cache import KVCache, QuantizedKVCache

TEXT = "The quick brown fox jumps over the lazy dog. Москва является столицей России. 敏捷的棕色狐狸"
# Measured on this model: mean KL 1.3e-4 nats (max 2.4e-3) over 41 teacher-forced positions at 8 bits
# (4 bits: 0.025 mean); the bound leaves room for other platforms.
KL_8BIT_BOUND = 1e-3


@pytest.fixture(scope="module")
def head64_checkpoint(tmp_path_factory, sp_model):
    """A lively tiny model with one head of 64 dims, so a group of 64 fits a head."""
    from xglm_fixtures import build_checkpoint, hub_config, random_weights

    weights = random_weights(hub_config(scale_embedding=False, attention_heads=1), seed=0)
    for name in weights:
        if name.endswith(("fc2.weight", "out_proj.weight")):
            weights[name] *= 4
    return build_checkpoint(
        tmp_path_factory.mktemp("head64"), sp_model, weights=weights, scale_embedding=False, attention_heads=1
    )


@pytest.fixture(scope="module")
def model_and_tokenizer(head64_checkpoint):
    return load(head64_checkpoint)


def teacher_forced_logprobs(model, ids: mx.array, bits: int | None) -> np.ndarray:
    """Log-probabilities at each position after the first 4, read one token at a time through a cache."""
    cache = make_prompt_cache(model)
    model(ids[None, :4], cache=cache)
    if bits is not None:
        cache = [c.to_quantized(group_size=64, bits=bits) for c in cache]
    rows = []
    for i in range(4, ids.size):
        logits = model(ids[None, i : i + 1], cache=cache)[0, -1]
        rows.append(logits - mx.logsumexp(logits))
    return np.array(mx.stack(rows))


def test_8bit_keeps_teacher_forced_logprobs_within_a_small_kl(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = mx.array(tokenizer.encode(TEXT))
    exact = teacher_forced_logprobs(model, ids, None)
    quantized = teacher_forced_logprobs(model, ids, 8)
    kl = (np.exp(exact) * (exact - quantized)).sum(-1)
    assert kl.mean() <= KL_8BIT_BOUND
    assert not np.allclose(exact, quantized, atol=1e-7)  # the cache really was quantized


def test_4bit_at_group_64_holds_at_most_0_3x_a_float16_cache():
    keys = mx.random.normal((1, 16, 300, 64), key=mx.random.key(0)).astype(mx.float16)
    fp16 = KVCache()
    fp16.update_and_fetch(keys, keys)
    for cache_keys in (keys, keys.astype(mx.float32)):
        quantized = QuantizedKVCache(group_size=64, bits=4)
        quantized.update_and_fetch(cache_keys, cache_keys)
        assert quantized.nbytes <= 0.3 * fp16.nbytes


def test_generate_step_quantizes_after_quantized_kv_start(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = mx.array(tokenizer.encode(TEXT))
    plain = [t for t, _ in generate_step(ids, model, max_tokens=12)]
    cache = make_prompt_cache(model)
    steps = generate_step(
        ids, model, max_tokens=12, prompt_cache=cache, kv_bits=8, quantized_kv_start=ids.size + 5
    )
    tokens = []
    for token, _ in steps:
        tokens.append(token)
        assert isinstance(cache[0], QuantizedKVCache) == (cache[0].offset > ids.size + 5 + 1)
    assert tokens == plain
    assert all(isinstance(c, QuantizedKVCache) and c.bits == 8 for c in cache)


def test_a_quantized_cache_trims_and_continues_like_a_fresh_one(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = mx.array(tokenizer.encode(TEXT))
    cache = [c.to_quantized(64, 8) for c in make_prompt_cache(model)]
    model(ids[None], cache=cache)
    for c in cache:
        c.trim(5)
    again = [c.to_quantized(64, 8) for c in make_prompt_cache(model)]
    model(ids[None, :-5], cache=again)
    a = model(ids[None, -5:], cache=cache)
    b = model(ids[None, -5:], cache=again)
    assert np.abs(np.array(a) - np.array(b)).max() <= 1e-4


def test_a_quantized_cache_file_round_trips(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    ids = mx.array(tokenizer.encode(TEXT))
    cache = make_prompt_cache(model)
    list(generate_step(ids, model, max_tokens=0, prompt_cache=cache, kv_bits=4))
    assert all(isinstance(c, QuantizedKVCache) for c in cache)
    save_prompt_cache(tmp_path / "q.safetensors", cache)
    loaded = load_prompt_cache(tmp_path / "q.safetensors")
    assert [type(c) for c in loaded] == [QuantizedKVCache] * len(cache)
    assert (loaded[0].bits, loaded[0].group_size, loaded[0].offset) == (4, 64, ids.size)
    assert loaded[0].nbytes == sum(p.nbytes for parts in cache[0].state for p in parts)
    after = mx.array(tokenizer.encode(" next", add_special_tokens=False))
    a, b = (np.array(model(after[None], cache=c)) for c in (cache, loaded))
    assert np.abs(a - b).max() == 0


def test_a_corrupt_quantized_cache_file_is_refused(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    cache = [c.to_quantized(64, 8) for c in make_prompt_cache(model)]
    model(mx.array(tokenizer.encode(TEXT))[None], cache=cache)
    cache[0].group_size = 32  # scales no longer match the packed values
    save_prompt_cache(tmp_path / "bad.safetensors", cache)
    with pytest.raises(XGLMError, match="not a usable prompt cache: layer 0 has quantized arrays"):
        load_prompt_cache(tmp_path / "bad.safetensors")


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"kv_bits": 7}, "kv_bits"),
        ({"kv_bits": 4, "kv_group_size": 48}, "kv_group_size"),
        ({"kv_bits": 4, "quantized_kv_start": -1}, "quantized_kv_start"),
        ({"kv_bits": 4, "max_kv_size": 16}, "kv_bits"),
    ],
)
def test_bad_quantization_settings_are_one_error_naming_the_param(model_and_tokenizer, kwargs, param):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(XGLMError) as info:
        list(generate_step(mx.array(tokenizer.encode(TEXT)), model, max_tokens=2, **kwargs))
    assert info.value.param == param


def test_a_group_size_that_does_not_divide_head_dim_is_refused(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint)  # head_dim 16
    with pytest.raises(XGLMError, match="does not divide the model's head_dim 16") as info:
        list(generate_step(mx.array(tokenizer.encode(TEXT)), model, max_tokens=2, kv_bits=8))
    assert info.value.param == "kv_group_size"


def test_batch_rows_equal_their_prompts_decoded_alone_with_kv_bits(model_and_tokenizer):
    from mlx_xglm import batch_generate

    model, tokenizer = model_and_tokenizer
    prompts = [TEXT, "Москва является", "The quick brown fox jumps"]
    alone = [
        [t for t, _ in generate_step(mx.array(tokenizer.encode(p)), model, max_tokens=10, kv_bits=8)]
        for p in prompts
    ]
    batched = batch_generate(model, tokenizer, prompts, 10, kv_bits=8, completion_batch_size=2)
    assert batched.token_ids == alone


def test_a_batch_continues_a_quantized_prompt_cache_and_quantizes_joining_rows(model_and_tokenizer):
    from mlx_xglm.decoding.engine import BatchGenerator
    from mlx_xglm.model.batch_cache import BatchQuantizedKVCache

    model, tokenizer = model_and_tokenizer
    ids = tokenizer.encode(TEXT)
    cache = make_prompt_cache(model)
    list(generate_step(mx.array(ids[:-3]), model, max_tokens=0, prompt_cache=cache, kv_bits=4))
    alone = [
        t for t, _ in generate_step(mx.array(ids[-3:]), model, max_tokens=6, prompt_cache=cache, kv_bits=4)
    ]
    cache = make_prompt_cache(model)
    list(generate_step(mx.array(ids[:-3]), model, max_tokens=0, prompt_cache=cache, kv_bits=4))
    gen = BatchGenerator(model, max_tokens=6, kv_bits=4, quantized_kv_start=100)
    uid = gen.insert([ids[-3:]], caches=[cache])[0]
    gen.insert([tokenizer.encode("Москва")])
    tokens = []
    while responses := gen.next():
        tokens += [r.token for r in responses if r.uid == uid]
        active = gen._active
        assert active is None or all(isinstance(c, BatchQuantizedKVCache) for c in active.cache)
    assert tokens == alone
    with pytest.raises(XGLMError) as error:
        BatchGenerator(model, kv_bits=8).insert([ids[-3:]], caches=[cache])
    assert error.value.param == "caches"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mlx_xglm.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_the_command_line_quantizes_the_cache_as_the_library(head64_checkpoint, model_and_tokenizer):
    from mlx_xglm import generate

    model, tokenizer = model_and_tokenizer
    flags = ["--kv-bits", "4", "--quantized-kv-start", "2"]
    out = run_cli("generate", "--model", str(head64_checkpoint), "-p", TEXT, "-m", "12", "--json", *flags)
    assert out.returncode == 0, out.stderr
    text = generate(model, tokenizer, TEXT, max_tokens=12, kv_bits=4, quantized_kv_start=2)
    assert json.loads(out.stdout)["text"] == text


def test_the_command_line_names_the_flag_of_a_group_size_that_does_not_fit(tiny_checkpoint):
    out = run_cli("generate", "--model", str(tiny_checkpoint), "-p", "Hello", "--kv-bits", "8")
    assert out.returncode != 0
    assert out.stderr.count("\n") == 1 and "--kv-group-size 64 does not divide" in out.stderr


def test_the_server_decodes_with_a_quantized_cache(head64_checkpoint, model_and_tokenizer):
    import httpx
    from xglm_fixtures import ServerProcess

    from mlx_xglm import generate

    model, tokenizer = model_and_tokenizer
    server = ServerProcess(head64_checkpoint, "--kv-bits", "8", "--quantized-kv-start", "0")
    try:
        body = {"prompt": TEXT, "max_tokens": 10, "temperature": 0}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        expected = generate(model, tokenizer, TEXT, max_tokens=10, kv_bits=8)
        assert response.json()["choices"][0]["text"] == expected
    finally:
        assert server.stop() == 0


def test_the_command_line_refuses_kv_bits_with_a_draft_model(head64_checkpoint):
    model = str(head64_checkpoint)
    out = run_cli("generate", "--model", model, "-p", "Hi", "--kv-bits", "8", "--draft-model", model)
    assert out.returncode != 0
    assert out.stderr.count("\n") == 1 and "--draft-model cannot take --kv-bits" in out.stderr
