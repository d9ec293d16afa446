"""How text becomes a prompt: the leading `</s>` of a document, and the two newline modes."""

import pytest

from mlx_xglm import XGLMError, XGLMTokenizer
from mlx_xglm.tokenization import NEWLINES, check_newlines, prompt_ids


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return XGLMTokenizer.from_pretrained(tiny_checkpoint)


def test_a_text_starting_a_document_gets_its_leading_eos(tokenizer):
    assert prompt_ids(tokenizer, "Hello world") == tokenizer.encode("Hello world")
    assert prompt_ids(tokenizer, "Hello world")[0] == tokenizer.eos_token_id


def test_a_text_continuing_a_cached_prompt_gets_no_second_eos(tokenizer):
    ids = prompt_ids(tokenizer, "Hello world", cached_tokens=7)
    assert ids == tokenizer.encode("Hello world", add_special_tokens=False)
    assert tokenizer.eos_token_id not in ids


def test_ids_are_used_as_given(tokenizer):
    assert prompt_ids(tokenizer, [5, 6, 7]) == [5, 6, 7]
    assert prompt_ids(tokenizer, (5, 6), cached_tokens=3) == [5, 6]


def test_eos_mode_writes_each_newline_as_eos(tokenizer):
    eos = tokenizer.eos_token_id
    ids = prompt_ids(tokenizer, "one\ntwo", newlines="eos")
    assert ids == [eos, *tokenizer.encode("one", False), eos, *tokenizer.encode("two", False)]


def test_only_the_two_newline_modes_are_accepted():
    assert [check_newlines(mode) for mode in NEWLINES] == ["space", "eos"]
    with pytest.raises(XGLMError, match="newlines must be 'space' or 'eos'") as error:
        check_newlines("crlf")
    assert error.value.param == "newlines"
