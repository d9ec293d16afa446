"""Prompt-lookup decoding: transformers' n-gram rule, plain decoding's greedy tokens, the model's
distribution when sampling, and the cache trimmed back to the tokens handed out."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from xglm_fixtures import build_checkpoint, hub_config, random_weights

from mlx_xglm import XGLMError, generate_step, load, make_logits_processors, make_prompt_cache, make_sampler
from mlx_xglm.decoding.prompt_lookup import lookup_candidates, prompt_lookup_generate_step
from mlx_xglm.decoding.speculative import accept_draft

# A prompt that repeats itself, so lookups find continuations.
PROMPT = mx.array([2, 100, 200, 300, 17, 5, 100, 200, 300, 17, 5, 100, 200])


@pytest.fixture(scope="module")
def lively(tmp_path_factory, sp_model):
    """A model whose greedy output changes token to token: most copied proposals are rejected."""
    weights = random_weights(hub_config(scale_embedding=False), seed=0)
    for name in weights:
        if name.endswith(("fc2.weight", "out_proj.weight")):
            weights[name] *= 4
    return load(
        build_checkpoint(tmp_path_factory.mktemp("lively"), sp_model, weights=weights, scale_embedding=False)
    )[0]


@pytest.fixture(scope="module")
def repeater(tiny_checkpoint):
    """The default tiny model: greedy decoding repeats the last prompt token, so copies are accepted."""
    return load(tiny_checkpoint)[0]


def plain(model, prompt, max_tokens, **kwargs):
    return [t for t, _ in generate_step(prompt, model, max_tokens=max_tokens, **kwargs)]


def lookup(model, prompt, max_tokens, **kwargs):
    return list(prompt_lookup_generate_step(prompt, model, max_tokens=max_tokens, **kwargs))


@pytest.mark.parametrize(
    "tokens, num, ngram, expected",
    [
        ([1, 2, 3, 9, 1, 2, 3, 8, 2, 3], 3, 2, [9, 1, 2]),  # the earliest match of the 2-gram (2, 3)
        ([1, 2, 3, 9, 5, 3], 2, 2, [9, 5]),  # no earlier (5, 3): fall back to the 1-gram (3)
        ([4, 7, 4], 5, 3, [7, 4]),  # the continuation stops at the end of the text
        ([1, 2, 3, 4], 3, 2, []),  # no match
        ([6], 3, 2, []),
    ],
)
def test_lookup_follows_transformers_rule(tokens, num, ngram, expected):
    assert lookup_candidates(np.array(tokens), num, ngram).tolist() == expected


@pytest.mark.parametrize("num_tokens", [1, 3, 10])
def test_greedy_tokens_equal_plain_decoding_when_copies_are_rejected(lively, num_tokens):
    out = lookup(lively, PROMPT, 30, prompt_lookup_num_tokens=num_tokens)
    assert [t for t, _, _ in out] == plain(lively, PROMPT, 30)


def test_greedy_tokens_equal_plain_decoding_when_copies_are_accepted(repeater):
    out = lookup(repeater, PROMPT, 40, prompt_lookup_num_tokens=5)
    assert [t for t, _, _ in out] == plain(repeater, PROMPT, 40)
    assert sum(d for _, _, d in out) >= 25


def test_logprobs_are_the_models(repeater):
    out = lookup(repeater, PROMPT, 12, prompt_lookup_num_tokens=4)
    expected = [np.array(lp) for _, lp in generate_step(PROMPT, repeater, max_tokens=12)]
    assert all(np.abs(np.array(lp) - e).max() <= 1e-4 for (_, lp, _), e in zip(out, expected, strict=True))


def test_repetition_penalty_sees_the_same_history(lively):
    processors = make_logits_processors(repetition_penalty=1.5)
    out = lookup(lively, PROMPT, 24, prompt_lookup_num_tokens=3, logits_processors=processors)
    assert [t for t, _, _ in out] == plain(lively, PROMPT, 24, logits_processors=processors)


def test_chunked_prefill_and_kv_bits_keep_the_tokens(lively):
    out = lookup(lively, PROMPT, 12, prompt_lookup_num_tokens=3, prefill_step_size=4)
    assert [t for t, _, _ in out] == plain(lively, PROMPT, 12)


def test_the_cache_ends_at_the_tokens_handed_out(repeater):
    cache = make_prompt_cache(repeater)
    steps = prompt_lookup_generate_step(PROMPT, repeater, max_tokens=30, prompt_cache=cache)
    for _ in range(7):
        next(steps)
    steps.close()
    assert cache[0].offset == PROMPT.size + 6
    cache = make_prompt_cache(repeater)
    assert len(lookup(repeater, PROMPT, 20, prompt_cache=cache)) == 20
    assert cache[0].offset == PROMPT.size + 19


def test_a_point_mass_proposal_keeps_the_model_distribution():
    """A copied token x is kept with probability p(x), else one is drawn from p without x: the token
    handed out follows p."""
    mx.random.seed(0)
    p = np.array([0.5, 0.3, 0.15, 0.05])
    logp = mx.log(mx.array(p))[None]
    sampler = make_sampler(temp=1.0)
    counts, trials = np.zeros(4), 3000
    proposal = mx.array([1])
    point = mx.log((mx.arange(4)[None] == proposal[:, None]).astype(mx.float32))
    for _ in range(trials):
        n, token = accept_draft(mx.concatenate([logp, logp]), proposal, point, sampler)
        counts[1 if n.item() else token.item()] += 1
    assert np.abs(counts / trials - p).max() < 0.035


def test_sampling_accepts_copies_the_model_is_sure_of(repeater):
    mx.random.seed(1)
    out = lookup(repeater, PROMPT, 20, prompt_lookup_num_tokens=4, sampler=make_sampler(temp=0.01))
    assert [t for t, _, _ in out] == plain(repeater, PROMPT, 20)
    assert any(d for _, _, d in out)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"prompt_lookup_num_tokens": 0}, "prompt_lookup_num_tokens"),
        ({"max_matching_ngram_size": 0}, "max_matching_ngram_size"),
        ({"sampler": lambda logprobs: mx.argmax(logprobs, axis=-1)}, "sampler"),
    ],
)
def test_bad_arguments_name_their_parameter(lively, kwargs, param):
    with pytest.raises(XGLMError) as error:
        lookup(lively, PROMPT, 4, **kwargs)
    assert error.value.param == param


def test_stream_generate_with_prompt_lookup_gives_the_same_text(repeater, tiny_checkpoint):
    from mlx_xglm import XGLMTokenizer, stream_generate

    tokenizer = XGLMTokenizer.from_pretrained(tiny_checkpoint)
    plain_out = list(stream_generate(repeater, tokenizer, PROMPT, 16))
    looked = list(stream_generate(repeater, tokenizer, PROMPT, 16, prompt_lookup_num_tokens=4))
    assert [r.token for r in looked] == [r.token for r in plain_out]
    assert "".join(r.text for r in looked) == "".join(r.text for r in plain_out)
    assert any(r.from_draft for r in looked)
    for kwargs, param in [
        ({"max_kv_size": 32}, "max_kv_size"),
        ({"draft_model": repeater}, "prompt_lookup_num_tokens"),
    ]:
        with pytest.raises(XGLMError) as error:
            next(stream_generate(repeater, tokenizer, PROMPT, 4, prompt_lookup_num_tokens=3, **kwargs))
        assert error.value.param == param


def test_the_command_line_generates_the_same_text_with_prompt_lookup(lively_checkpoint):
    def run(*extra):
        args = ["generate", "--model", str(lively_checkpoint), "--prompt", "Hello Hello Hello", "-m", "12"]
        out = subprocess.run(
            [sys.executable, "-m", "mlx_xglm.cli", *args, "--json", *extra],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    looked = run("--prompt-lookup-tokens", "4")
    assert looked["tokens"] == run()["tokens"]


@pytest.mark.parametrize("flags", [["--prompt-lookup-tokens", "4"], ["--draft-model", "TINY"]])
def test_the_server_decodes_with_prompt_lookup_or_a_draft_model(lively_checkpoint, tiny_checkpoint, flags):
    import httpx
    from xglm_fixtures import ServerProcess

    from mlx_xglm import generate

    model, tokenizer = load(lively_checkpoint)
    flags = [str(tiny_checkpoint) if f == "TINY" else f for f in flags]
    server = ServerProcess(lively_checkpoint, *flags)
    try:
        prompts = ["Hello Hello Hello", "Der Hund"]
        body = {"prompt": prompts, "max_tokens": 10, "temperature": 0}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        texts = [c["text"] for c in sorted(response.json()["choices"], key=lambda c: c["index"])]
        assert texts == [generate(model, tokenizer, p, max_tokens=10) for p in prompts]
    finally:
        assert server.stop() == 0
