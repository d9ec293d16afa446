"""Speculative decoding: the same greedy tokens as plain decoding, the target's distribution when sampling,
and both caches trimmed back to the tokens handed out."""

import json

import mlx.core as mx
import numpy as np
import pytest
from xglm_fixtures import build_checkpoint, hub_config, random_weights

from mlx_xglm import (
    XGLMError,
    generate_step,
    load,
    make_logits_processors,
    make_prompt_cache,
    make_sampler,
)
from mlx_xglm.bench import make_agreeing_draft
from mlx_xglm.decoding.speculative import accept_draft, check_draft_model, speculative_generate_step
from mlx_xglm.model.cache import RotatingKVCache

PROMPT = mx.array([2, 100, 200, 300, 17, 5])


@pytest.fixture(scope="module")
def target(tmp_path_factory, sp_model):
    """A 4-layer model whose greedy output changes token to token (see conftest's lively_checkpoint)."""
    config = hub_config(scale_embedding=False, num_layers=4)
    weights = random_weights(config, seed=0)
    for name in weights:
        if name.endswith(("fc2.weight", "out_proj.weight")):
            weights[name] *= 4
    folder = build_checkpoint(
        tmp_path_factory.mktemp("target"), sp_model, weights=weights, scale_embedding=False, num_layers=4
    )
    return load(folder)[0]


@pytest.fixture(scope="module")
def unrelated_draft(tiny_checkpoint):
    """A draft with other random weights: it proposes mostly wrong tokens."""
    return load(tiny_checkpoint)[0]


def plain(model, max_tokens, **kwargs):
    return [t for t, _ in generate_step(PROMPT, model, max_tokens=max_tokens, **kwargs)]


def speculative(model, draft, max_tokens, **kwargs):
    return list(speculative_generate_step(PROMPT, model, draft, max_tokens=max_tokens, **kwargs))


@pytest.mark.parametrize("num_draft_tokens", [1, 3, 5])
def test_greedy_tokens_equal_plain_decoding_with_a_wrong_draft(target, unrelated_draft, num_draft_tokens):
    out = speculative(target, unrelated_draft, 30, num_draft_tokens=num_draft_tokens)
    assert [t for t, _, _ in out] == plain(target, 30)


def test_greedy_tokens_equal_plain_decoding_with_the_model_as_draft(target):
    out = speculative(target, target, 30, num_draft_tokens=4)
    assert [t for t, _, _ in out] == plain(target, 30)
    # Rounds of 4 accepted proposals and the model's own token: 6 rounds.
    assert [d for _, _, d in out] == ([True] * 4 + [False]) * 6


def test_repetition_penalty_sees_the_same_history(target, unrelated_draft):
    processors = make_logits_processors(repetition_penalty=1.5, repetition_context_size=8)
    out = speculative(target, unrelated_draft, 30, num_draft_tokens=3, logits_processors=processors)
    assert [t for t, _, _ in out] == plain(target, 30, logits_processors=processors)


def test_logprobs_are_the_models(target, unrelated_draft):
    reference = [lp for _, lp in generate_step(PROMPT, target, max_tokens=10)]
    out = speculative(target, unrelated_draft, 10, num_draft_tokens=3)
    for (_, logprobs, _), expected in zip(out, reference, strict=True):
        assert mx.allclose(logprobs, expected, atol=1e-4).item()


def test_a_draft_of_the_first_layers_agrees_with_a_model_whose_later_layers_are_identities(target):
    model = load_copy(target)
    expected = plain(model, 24)
    draft = make_agreeing_draft(model, 2)
    assert plain(model, 24) != expected  # the later layers did change the output ...
    out = speculative(model, draft, 24, num_draft_tokens=3)
    assert [t for t, _, _ in out] == plain(model, 24) == plain(draft, 24)  # ... and the draft matches it
    assert sum(d for _, _, d in out) == 18  # every proposal accepted: 6 rounds of 3 + 1


def load_copy(model):
    """A model with its own copy of `model`'s weights."""
    copy = type(model)(model.config)
    copy.update(model.parameters())
    copy.eval()
    return copy


def cache_keys(cache, length):
    return [layer.state[0][..., :length, :] for layer in cache]


def test_rejected_tokens_are_trimmed_from_both_caches(target, unrelated_draft):
    cache = make_prompt_cache(target) + make_prompt_cache(unrelated_draft)
    out = list(speculative_generate_step(PROMPT, target, unrelated_draft, max_tokens=20, prompt_cache=cache))
    assert not all(d for _, _, d in out) and any(d for _, _, d in out)
    model_cache, draft_cache = cache[:4], cache[4:]
    held = model_cache[0].offset
    assert all(c.offset == held for c in cache)
    assert PROMPT.size + 20 - 3 <= held <= PROMPT.size + 20 - 1
    # What the caches hold is exactly what a fresh read of those tokens gives.
    tokens = mx.concatenate([PROMPT, mx.array([t for t, _, _ in out])])[:held]
    for model, part in ((target, model_cache), (unrelated_draft, draft_cache)):
        fresh = make_prompt_cache(model)
        model(tokens[None], cache=fresh)
        for got, want in zip(cache_keys(part, held), cache_keys(fresh, held), strict=True):
            assert got.shape == want.shape and mx.allclose(got, want, atol=1e-4).item()


def test_closing_early_leaves_the_caches_at_the_tokens_handed_out(target, unrelated_draft):
    cache = make_prompt_cache(target) + make_prompt_cache(unrelated_draft)
    steps = speculative_generate_step(
        PROMPT, target, unrelated_draft, max_tokens=50, prompt_cache=cache, num_draft_tokens=4
    )
    for _ in range(7):
        next(steps)
    steps.close()
    offsets = {c.offset for c in cache}
    assert len(offsets) == 1 and offsets.pop() <= PROMPT.size + 7 - 1


def test_a_prompt_read_with_max_tokens_0_continues_like_one_prompt(target, unrelated_draft):
    cache = make_prompt_cache(target) + make_prompt_cache(unrelated_draft)
    assert (
        list(speculative_generate_step(PROMPT[:4], target, unrelated_draft, max_tokens=0, prompt_cache=cache))
        == []
    )
    assert {c.offset for c in cache} == {4}
    out = speculative_generate_step(PROMPT[4:], target, unrelated_draft, max_tokens=12, prompt_cache=cache)
    assert [t for t, _, _ in out] == plain(target, 12)


def test_chunked_prefill_gives_the_same_tokens(target, unrelated_draft):
    out = speculative(target, unrelated_draft, 12, prefill_step_size=2)
    assert [t for t, _, _ in out] == plain(target, 12)


def test_accept_rule_keeps_the_target_distribution_and_accepts_min_p_q():
    """Proposals drawn from q, kept with probability min(1, p/q), else replaced from max(p - q, 0):
    the first token follows p, and a proposal is kept with probability sum(min(p, q))."""
    mx.random.seed(0)
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.1, 0.2, 0.3, 0.4])
    logp, logq = mx.log(mx.array(p))[None], mx.log(mx.array(q))[None]
    sampler = make_sampler(temp=1.0)
    counts, accepted, trials = np.zeros(4), 0, 3000
    for _ in range(trials):
        proposal = mx.random.categorical(logq)
        n, token = accept_draft(mx.concatenate([logp, logp]), proposal, logq, sampler)
        n = n.item()
        counts[proposal.item() if n else token.item()] += 1
        accepted += n
    assert np.abs(counts / trials - p).max() < 0.035
    assert abs(accepted / trials - np.minimum(p, q).sum()) < 0.035


def test_sampling_with_the_model_as_draft_accepts_every_proposal(target):
    mx.random.seed(3)
    out = speculative(target, target, 20, num_draft_tokens=4, sampler=make_sampler(temp=1.0, top_k=50))
    assert [d for _, _, d in out] == ([True] * 4 + [False]) * 4


def test_a_draft_with_another_vocabulary_is_refused(target, make_checkpoint):
    other = load(make_checkpoint(vocab_size=1200))[0]
    with pytest.raises(XGLMError, match="vocabulary has 1200 tokens") as error:
        speculative(target, other, 4)
    assert error.value.param == "draft_model"


def test_a_draft_with_another_tokenizer_is_refused(target, tiny_checkpoint, tmp_path):
    from xglm_fixtures import train_sentencepiece

    from mlx_xglm import XGLMTokenizer

    tokenizer = XGLMTokenizer.from_pretrained(tiny_checkpoint)
    other = train_sentencepiece(tmp_path / "other.model", vocab_size=800)
    with pytest.raises(XGLMError, match="tokenizer differs") as error:
        check_draft_model(target, target, tokenizer, XGLMTokenizer(other))
    assert error.value.param == "draft_model"
    check_draft_model(target, target, tokenizer, XGLMTokenizer.from_pretrained(tiny_checkpoint))


@pytest.mark.parametrize(
    "kwargs, param, message",
    [
        ({"num_draft_tokens": 0}, "num_draft_tokens", "1 or more"),
        ({"sampler": lambda logprobs: mx.argmax(logprobs, -1)}, "sampler", "distribution"),
        ({"prompt_cache": "target only"}, "prompt_cache", "followed by the draft's"),
        ({"prompt_cache": "rotating"}, "prompt_cache", "rotating cache"),
    ],
)
def test_bad_arguments_name_their_parameter(target, unrelated_draft, kwargs, param, message):
    if kwargs.get("prompt_cache") == "target only":
        kwargs["prompt_cache"] = make_prompt_cache(target)
    elif kwargs.get("prompt_cache") == "rotating":
        kwargs["prompt_cache"] = [RotatingKVCache(16) for _ in range(6)]
    with pytest.raises(XGLMError, match=message) as error:
        speculative(target, unrelated_draft, 4, **kwargs)
    assert error.value.param == param


def test_stream_generate_with_a_draft_gives_the_same_text(target, unrelated_draft, tiny_checkpoint):
    from mlx_xglm import XGLMTokenizer, stream_generate

    tokenizer = XGLMTokenizer.from_pretrained(tiny_checkpoint)
    plain_out = list(stream_generate(target, tokenizer, PROMPT, 16))
    drafted = list(
        stream_generate(target, tokenizer, PROMPT, 16, draft_model=unrelated_draft, num_draft_tokens=2)
    )
    assert [r.token for r in drafted] == [r.token for r in plain_out]
    assert "".join(r.text for r in drafted) == "".join(r.text for r in plain_out)
    assert any(r.from_draft for r in drafted) and not any(r.from_draft for r in plain_out)
    assert drafted[-1].finish_reason == plain_out[-1].finish_reason
    with pytest.raises(XGLMError) as error:
        next(stream_generate(target, tokenizer, PROMPT, 4, draft_model=unrelated_draft, max_kv_size=32))
    assert error.value.param == "max_kv_size"


def test_the_command_line_generates_the_same_text_with_a_draft_model(lively_checkpoint, tiny_checkpoint):
    import subprocess
    import sys

    def run(*extra):
        args = ["generate", "--model", str(lively_checkpoint), "--prompt", "Hello", "-m", "12", "--json"]
        out = subprocess.run(
            [sys.executable, "-m", "mlx_xglm.cli", *args, *extra], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    plain_run = run()
    drafted = run("--draft-model", str(tiny_checkpoint), "--num-draft-tokens", "2")
    assert drafted["tokens"] == plain_run["tokens"] and drafted["text"] == plain_run["text"]


def test_the_command_line_refuses_a_draft_with_another_vocabulary(lively_checkpoint, make_checkpoint):
    import subprocess
    import sys

    other = make_checkpoint(vocab_size=1200)
    args = ["generate", "--model", str(lively_checkpoint), "--prompt", "Hi", "--draft-model", str(other)]
    out = subprocess.run(
        [sys.executable, "-m", "mlx_xglm.cli", *args], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: --draft-model ") and "vocabulary has 1200 tokens" in line
