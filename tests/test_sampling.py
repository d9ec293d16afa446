"""Samplers and logits processors."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_xglm import XGLMError, make_logits_processors, make_sampler

PROBS = [0.5, 0.3, 0.15, 0.05]


def logprobs_rows(probs, rows=2000):
    return mx.broadcast_to(mx.log(mx.array(probs)), (rows, len(probs)))


def sampled_set(sampler, probs):
    return set(np.array(sampler(logprobs_rows(probs))).tolist())


def test_temperature_zero_is_argmax():
    logprobs = mx.log(mx.array([[0.1, 0.6, 0.3], [0.7, 0.2, 0.1]]))
    assert make_sampler()(logprobs).tolist() == [1, 0]


def test_top_k_1_equals_greedy():
    rng = np.random.default_rng(0)
    logits = mx.array(rng.standard_normal((64, 1000)).astype(np.float32))
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    assert mx.array_equal(make_sampler(temp=1.0, top_k=1)(logprobs), make_sampler()(logprobs))


def test_sampling_at_temperature_one_draws_every_token():
    assert sampled_set(make_sampler(temp=1.0), PROBS) == {0, 1, 2, 3}


def test_top_k_keeps_the_k_most_likely():
    assert sampled_set(make_sampler(temp=1.0, top_k=2), PROBS) == {0, 1}


def test_top_p_removes_the_tail():
    # 0.5 + 0.3 reaches 0.8: the two least likely tokens are never drawn.
    assert sampled_set(make_sampler(temp=1.0, top_p=0.8), PROBS) == {0, 1}
    assert sampled_set(make_sampler(temp=1.0, top_p=0.81), PROBS) == {0, 1, 2}


def test_min_p_removes_tokens_far_below_the_best():
    # 0.2 * 0.5 = 0.1: only the 0.05 token falls below.
    assert sampled_set(make_sampler(temp=1.0, min_p=0.2), PROBS) == {0, 1, 2}


def test_min_tokens_to_keep_overrides_the_cuts():
    assert sampled_set(make_sampler(temp=1.0, top_p=0.1, min_tokens_to_keep=3), PROBS) == {0, 1, 2}
    assert sampled_set(make_sampler(temp=1.0, min_p=0.9, min_tokens_to_keep=2), PROBS) == {0, 1}


def test_low_temperature_sharpens():
    draws = np.array(make_sampler(temp=0.1)(logprobs_rows(PROBS)))
    assert (draws == 0).mean() > 0.95


def test_seed_makes_sampling_reproducible():
    sampler = make_sampler(temp=1.0, top_p=0.9)
    mx.random.seed(7)
    first = sampler(logprobs_rows(PROBS, 100))
    mx.random.seed(7)
    again = sampler(logprobs_rows(PROBS, 100))
    assert mx.array_equal(first, again)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temp": -0.5}, "temp"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"min_tokens_to_keep": 0}, "min_tokens_to_keep"),
    ],
)
def test_invalid_sampler_values_are_named(kwargs, name):
    with pytest.raises(XGLMError, match=name) as error:
        make_sampler(**kwargs)
    assert error.value.param == name


def test_a_bad_value_is_a_value_error_that_names_its_parameter():
    # Python callers catch ValueError for a bad value; the project's one error type is one.
    with pytest.raises(ValueError, match="temp") as error:
        make_sampler(temp=-1)
    assert isinstance(error.value, XGLMError) and error.value.param == "temp"


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": 1.2, "repetition_context_size": 0}, "repetition_context_size"),
    ],
)
def test_invalid_processor_values_are_named(kwargs, name):
    with pytest.raises(XGLMError, match=name) as error:
        make_logits_processors(**kwargs)
    assert error.value.param == name


def test_repetition_penalty_lowers_repeated_tokens_probability():
    logits = mx.array([[2.0, -1.0, 0.5, 1.0]])
    (penalty,) = make_logits_processors(repetition_penalty=2.0)
    out = penalty(mx.array([0, 1, 1]), logits)
    assert out.tolist() == [[1.0, -2.0, 0.5, 1.0]]
    probs = mx.softmax(out, axis=-1)[0].tolist()
    before = mx.softmax(logits, axis=-1)[0].tolist()
    assert probs[0] < before[0] and probs[1] < before[1] and probs[3] > before[3]


def test_repetition_context_size_limits_the_window():
    logits = mx.array([[2.0, 2.0, 2.0]])
    (penalty,) = make_logits_processors(repetition_penalty=2.0, repetition_context_size=1)
    assert penalty(mx.array([0, 1]), logits).tolist() == [[2.0, 1.0, 2.0]]


def test_logit_bias_adds_to_the_named_ids():
    (bias,) = make_logits_processors(logit_bias={2: 5.0, 0: -1.5})
    assert bias(mx.array([]), mx.zeros((1, 3))).tolist() == [[-1.5, 0.0, 5.0]]


def test_no_processors_by_default():
    assert make_logits_processors() == []
    assert make_logits_processors(repetition_penalty=1.0) == []


def test_sampled_frequencies_follow_the_distribution():
    draws = np.array(make_sampler(temp=1.0)(logprobs_rows(PROBS, 20000)))
    freqs = np.bincount(draws, minlength=4) / draws.size
    assert np.allclose(freqs, PROBS, atol=0.02)
    assert math.isclose(freqs.sum(), 1.0)
