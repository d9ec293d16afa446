"""Sampling settings as OpenAI and vLLM read them: tiny temperatures are greedy, frequency and presence
penalties count generated tokens only, and non-finite settings are refused."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest

from mlx_xglm.decoding.sample_utils import greedy, make_logits_processors, make_sampler
from mlx_xglm.errors import XGLMError


@pytest.mark.parametrize("temp", [0.0, 1e-6, 1e-40, 5e-324])
def test_a_temperature_below_1e_5_is_greedy(temp):
    assert make_sampler(temp=temp) is greedy


@pytest.mark.parametrize("temp", [math.nan, math.inf, -1.0])
def test_a_non_finite_or_negative_temperature_is_refused(temp):
    with pytest.raises(XGLMError) as e:
        make_sampler(temp=temp)
    assert e.value.param == "temp"


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    (penalty,) = make_logits_processors(frequency_penalty=0.5, presence_penalty=0.25)
    logits = mx.zeros((1, 8))
    prompt = mx.array([3, 3, 4])
    assert penalty(prompt, logits).tolist() == logits.tolist()  # the prompt sets where counting starts
    after = penalty(mx.array([3, 3, 4, 5, 5, 6]), logits)[0].tolist()
    assert after[3] == after[4] == 0.0
    assert after[5] == pytest.approx(-(2 * 0.5 + 0.25))
    assert after[6] == pytest.approx(-(0.5 + 0.25))


def test_negative_penalties_favour_generated_tokens():
    (penalty,) = make_logits_processors(presence_penalty=-1.0)
    penalty(mx.array([1]), mx.zeros((1, 4)))
    assert penalty(mx.array([1, 2]), mx.zeros((1, 4)))[0].tolist() == [0.0, 0.0, 1.0, 0.0]


def test_zero_penalties_add_no_processor():
    assert make_logits_processors(frequency_penalty=0.0, presence_penalty=0.0) == []


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"frequency_penalty": math.nan}, "frequency_penalty"),
        ({"presence_penalty": math.inf}, "presence_penalty"),
        ({"logit_bias": {3: math.nan}}, "logit_bias"),
        ({"logit_bias": {3: -math.inf}}, "logit_bias"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"repetition_penalty": math.nan}, "repetition_penalty"),
    ],
)
def test_non_finite_settings_are_refused(kwargs, param):
    with pytest.raises(XGLMError) as e:
        make_logits_processors(**kwargs)
    assert e.value.param == param
