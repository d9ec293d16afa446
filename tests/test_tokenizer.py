"""XGLMTokenizer: id-for-id parity with transformers 4.56's slow XGLMTokenizer, and its own rules."""

import pytest
from reference import reference_tokenizer
from xglm_fixtures import PARITY_STRINGS

from mlx_xglm import XGLMError, XGLMTokenizer


@pytest.fixture(scope="module")
def tokenizers(tiny_checkpoint, transformers):
    return XGLMTokenizer.from_pretrained(tiny_checkpoint), reference_tokenizer(tiny_checkpoint)


@pytest.mark.reference
@pytest.mark.parametrize("text", PARITY_STRINGS)
def test_encode_matches_reference(tokenizers, text):
    ours, ref = tokenizers
    assert ours.encode(text) == ref(text).input_ids
    assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids


@pytest.mark.reference
@pytest.mark.parametrize("text", PARITY_STRINGS)
def test_decode_matches_reference(tokenizers, text):
    ours, ref = tokenizers
    ids = ref(text).input_ids
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids) == ref.decode(ids)


@pytest.mark.reference
def test_vocabulary_matches_reference(tokenizers):
    ours, ref = tokenizers
    assert ours.vocab_size == ref.vocab_size == len(ref)
    ids = list(range(ours.vocab_size))
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    tokens = ref.convert_ids_to_tokens(ids)
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)


def test_sequences_start_with_eos_not_bos(tiny_checkpoint):
    tok = XGLMTokenizer.from_pretrained(tiny_checkpoint)
    ids = tok.encode("Hello")
    assert ids[0] == tok.eos_token_id == 2
    assert tok.bos_token_id not in ids
    assert ids[-1] != tok.eos_token_id


def test_special_ids(tiny_checkpoint):
    tok = XGLMTokenizer.from_pretrained(tiny_checkpoint)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    pieces = tok.sp_model.get_piece_size()
    assert tok.convert_tokens_to_ids("<madeupword0>") == pieces + 1
    assert tok.convert_tokens_to_ids("<madeupword6>") == tok.vocab_size - 1
    assert tok.encode("<madeupword2>", add_special_tokens=False) == [pieces + 3]


def test_unknown_characters_become_unk(tiny_checkpoint):
    tok = XGLMTokenizer.from_pretrained(tiny_checkpoint)
    assert tok.unk_token_id in tok.encode("☃")


def test_missing_vocab_file_is_a_clear_error(tmp_path):
    with pytest.raises(XGLMError, match="sentencepiece.bpe.model"):
        XGLMTokenizer.from_pretrained(tmp_path)


def test_corrupt_vocab_file_is_a_clear_error(tmp_path):
    (tmp_path / "sentencepiece.bpe.model").write_bytes(b"not a model")
    with pytest.raises(XGLMError, match="not a readable sentencepiece model"):
        XGLMTokenizer.from_pretrained(tmp_path)


def test_id_outside_vocabulary_is_a_clear_error(tiny_checkpoint):
    tok = XGLMTokenizer.from_pretrained(tiny_checkpoint)
    with pytest.raises(XGLMError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
