"""mlx-lm can drive an XGLM model: our model and caches follow its call conventions."""

import mlx.core as mx
import pytest

from mlx_xglm import generate_step, load, make_logits_processors, make_prompt_cache


def test_mlx_lm_generate_step_drives_an_xglm_model(lively_checkpoint):
    mlx_lm_generate = pytest.importorskip("mlx_lm.generate")
    model, tokenizer = load(lively_checkpoint)
    prompt = mx.array(tokenizer.encode("Le renard brun rapide"))
    ours = [t for t, _ in generate_step(prompt, model, max_tokens=30, prefill_step_size=4)]
    theirs = [
        int(t) for t, _ in mlx_lm_generate.generate_step(prompt, model, max_tokens=30, prefill_step_size=4)
    ]
    assert theirs == ours


def test_mlx_lm_generate_step_uses_our_logits_processors(lively_checkpoint):
    mlx_lm_generate = pytest.importorskip("mlx_lm.generate")
    model, tokenizer = load(lively_checkpoint)
    prompt = mx.array(tokenizer.encode("Москва является"))
    lp = make_logits_processors(repetition_penalty=1.3, repetition_context_size=20)
    ours = [t for t, _ in generate_step(prompt, model, max_tokens=30, logits_processors=lp)]
    theirs = [
        int(t) for t, _ in mlx_lm_generate.generate_step(prompt, model, max_tokens=30, logits_processors=lp)
    ]
    assert theirs == ours and len(set(ours)) > 3


def test_mlx_lm_generate_step_runs_our_rotating_cache(lively_checkpoint):
    mlx_lm_generate = pytest.importorskip("mlx_lm.generate")
    model, tokenizer = load(lively_checkpoint)
    prompt = mx.array(tokenizer.encode("Le renard brun rapide"))
    ours = [t for t, _ in generate_step(prompt, model, max_tokens=40, max_kv_size=16)]
    cache = make_prompt_cache(model, max_kv_size=16)
    theirs = [
        int(t) for t, _ in mlx_lm_generate.generate_step(prompt, model, max_tokens=40, prompt_cache=cache)
    ]
    assert theirs == ours and cache[0].offset == prompt.size + 40
