"""Token ids are checked where a user hands them over: outside the vocabulary is one XGLMError naming the
parameter, never a read past the embedding table (garbage or a segfault)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from xglm_fixtures import VOCAB_SIZE

from mlx_xglm import load
from mlx_xglm.decoding import BatchGenerator, generate, generate_step, stream_generate
from mlx_xglm.errors import XGLMError
from mlx_xglm.evaluation import loglikelihood_tokens
from mlx_xglm.model.token_ids import check_token_ids

BAD_IDS = [-1, VOCAB_SIZE, VOCAB_SIZE + 5000]


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load(tiny_checkpoint)


@pytest.mark.parametrize("bad", BAD_IDS)
def test_generate_refuses_ids_outside_the_vocabulary(loaded, bad):
    model, tokenizer = loaded
    with pytest.raises(XGLMError, match=f"token id {bad}") as e:
        generate(model, tokenizer, [2, bad], max_tokens=2)
    assert e.value.param == "prompt"


@pytest.mark.parametrize("bad", BAD_IDS)
def test_generate_step_and_stream_generate_refuse_bad_arrays(loaded, bad):
    model, tokenizer = loaded
    with pytest.raises(XGLMError) as e:
        next(generate_step(mx.array([2, bad]), model, max_tokens=1))
    assert e.value.param == "prompt"
    with pytest.raises(XGLMError):
        next(stream_generate(model, tokenizer, mx.array([2, bad]), max_tokens=1))


def test_float_ids_are_refused(loaded):
    model, _ = loaded
    with pytest.raises(XGLMError, match="integers"):
        next(generate_step(mx.array([2.0, 5.0]), model, max_tokens=1))


@pytest.mark.parametrize("bad", BAD_IDS)
def test_batch_generator_insert_refuses_bad_ids(loaded, bad):
    model, _ = loaded
    generator = BatchGenerator(model)
    with pytest.raises(XGLMError) as e:
        generator.insert([[2, 5], [2, bad]], max_tokens=1)
    assert e.value.param == "prompts"
    assert generator.next() == []


@pytest.mark.parametrize("bad", BAD_IDS)
def test_forward_refuses_bad_input_ids(loaded, bad):
    model, _ = loaded
    with pytest.raises(XGLMError) as e:
        model.forward(input_ids=mx.array([[2, bad]]))
    assert e.value.param == "input_ids"


@pytest.mark.parametrize("bad", BAD_IDS)
def test_loglikelihood_tokens_refuses_bad_ids(loaded, bad):
    model, _ = loaded
    with pytest.raises(XGLMError) as e:
        loglikelihood_tokens(model, [([2, 5], [bad])])
    assert e.value.param == "requests"


def test_ids_inside_the_vocabulary_pass_unchanged():
    ids = [[0, VOCAB_SIZE - 1], [3]]
    assert check_token_ids(ids, VOCAB_SIZE) is ids


def test_load_refuses_a_config_vocabulary_smaller_than_the_tokenizer(make_checkpoint):
    folder = make_checkpoint(vocab_size=VOCAB_SIZE - 8)
    with pytest.raises(XGLMError, match="vocab_size") as e:
        load(folder)
    assert e.value.param == "vocab_size"


def test_text_with_a_lone_surrogate_is_refused(loaded):
    model, tokenizer = loaded
    with pytest.raises(XGLMError, match="lone surrogate") as e:
        generate(model, tokenizer, "Bonjour \ud800", max_tokens=1)
    assert e.value.param == "text"
