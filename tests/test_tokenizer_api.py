"""XGLMTokenizer's transformers surface: batches, pairs, padding, truncation, helpers, saving."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import sentencepiece as spm
from reference import reference_tokenizer
from xglm_fixtures import PARITY_STRINGS

from mlx_xglm import BatchEncoding, XGLMError, XGLMTokenizer

TEXTS = ["Hello world, this is a longer text here", "short", "Привет мир, как дела у тебя"]
PAIRS = ["a pair", "another much longer pair of words to cut down", "x"]

CALLS = {
    "plain": {},
    "padding-true": {"padding": True},
    "padding-longest": {"padding": "longest"},
    "padding-max-length": {"padding": "max_length", "max_length": 30},
    "truncation-true": {"truncation": True, "max_length": 6},
    "max-length-alone": {"max_length": 5},
    "truncate-and-pad": {"padding": True, "truncation": "longest_first", "max_length": 9},
    "only-first": {"truncation": "only_first", "max_length": 14, "padding": True},
    "multiple-of": {"padding": True, "pad_to_multiple_of": 8},
    "max-length-multiple-of": {
        "padding": "max_length",
        "truncation": True,
        "max_length": 16,
        "pad_to_multiple_of": 8,
    },
    "no-special-tokens": {"add_special_tokens": False, "padding": True},
    "no-attention-mask": {"padding": True, "return_attention_mask": False},
    "model-max-length": {"padding": "max_length", "truncation": True},
}


@pytest.fixture(scope="module")
def tokenizers(tiny_checkpoint, transformers):
    return XGLMTokenizer.from_pretrained(tiny_checkpoint), reference_tokenizer(tiny_checkpoint)


def both(tokenizers, padding_side, truncation_side):
    ours, ref = tokenizers
    ours.padding_side = ref.padding_side = padding_side
    ours.truncation_side = ref.truncation_side = truncation_side
    return ours, ref


@pytest.mark.reference
@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize("sides", [("left", "right"), ("right", "left")])
def test_call_matches_reference(tokenizers, name, sides):
    ours, ref = both(tokenizers, *sides)
    if name == "only-first":
        inputs = [([TEXTS[0], TEXTS[2]], ["x", "y z"])]
    else:
        inputs = [(TEXTS, None), (TEXTS, PAIRS), (TEXTS[0], None), (TEXTS[0], PAIRS[1])]
    for text, pair in inputs:
        got = ours(text, pair, **CALLS[name])
        assert isinstance(got, BatchEncoding)
        assert dict(got) == dict(ref(text, pair, **CALLS[name]))


@pytest.mark.reference
@pytest.mark.parametrize("return_tensors", ["np", "mlx"])
def test_tensors_match_reference(tokenizers, return_tensors):
    ours, ref = both(tokenizers, "left", "right")
    for text in (TEXTS, TEXTS[1]):
        got = ours(text, padding=True, return_tensors=return_tensors)
        expected = ref(text, padding=True, return_tensors="np")
        assert isinstance(got.input_ids, mx.array if return_tensors == "mlx" else np.ndarray)
        for key in ("input_ids", "attention_mask"):
            assert np.array_equal(np.array(got[key]), expected[key])


def test_padding_is_on_the_left_by_default(tiny_checkpoint):
    tok = XGLMTokenizer.from_pretrained(tiny_checkpoint)
    enc = tok(["a b c d e f", "a"], padding=True)
    assert enc.input_ids[1][0] == tok.pad_token_id and enc.attention_mask[1][0] == 0
    assert enc.input_ids[1][-2:] == tok.encode("a")


@pytest.mark.reference
def test_special_token_helpers_match_reference(tokenizers):
    ours, ref = tokenizers
    a, b = ours.encode(TEXTS[0], add_special_tokens=False), ours.encode(PAIRS[0], add_special_tokens=False)
    for args in ((a,), (a, b)):
        assert ours.build_inputs_with_special_tokens(*args) == ref.build_inputs_with_special_tokens(*args)
        assert ours.get_special_tokens_mask(*args) == ref.get_special_tokens_mask(*args)
        assert ours.create_token_type_ids_from_sequences(*args) == ref.create_token_type_ids_from_sequences(
            *args
        )
    built = ours.build_inputs_with_special_tokens(a, b)
    assert built == [2, *a, 2, 2, *b]
    assert ours.get_special_tokens_mask(
        built, already_has_special_tokens=True
    ) == ref.get_special_tokens_mask(built, already_has_special_tokens=True)
    assert ours.num_special_tokens_to_add(True) == ref.num_special_tokens_to_add(True) == 3


@pytest.mark.reference
def test_vocab_tokenize_and_strings_match_reference(tokenizers):
    ours, ref = tokenizers
    assert ours.get_vocab() == ref.get_vocab()
    for text in PARITY_STRINGS:
        tokens = ours.tokenize(text)
        assert tokens == ref.tokenize(text)
        assert ours.convert_tokens_to_string(tokens) == ref.convert_tokens_to_string(tokens)


@pytest.mark.reference
def test_batch_decode_matches_reference(tokenizers):
    ours, ref = both(tokenizers, "left", "right")
    ids = ours(TEXTS, padding=True).input_ids
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == ref.batch_decode(
            ids, skip_special_tokens=skip
        )


@pytest.mark.reference
def test_save_pretrained_loads_in_transformers_with_identical_ids(tiny_checkpoint, tmp_path, transformers):
    ours = XGLMTokenizer.from_pretrained(tiny_checkpoint, padding_side="right", model_max_length=12)
    written = ours.save_pretrained(tmp_path / "saved")
    assert sorted(p.split("/")[-1] for p in written) == sorted(
        ["sentencepiece.bpe.model", "tokenizer_config.json", "special_tokens_map.json"]
    )
    ref = transformers.XGLMTokenizer.from_pretrained(tmp_path / "saved")
    again = XGLMTokenizer.from_pretrained(tmp_path / "saved")
    assert ref.padding_side == again.padding_side == "right"
    assert ref.model_max_length == again.model_max_length == 12
    assert ref.get_vocab() == ours.get_vocab() == again.get_vocab()
    assert ref.all_special_ids == sorted(ours.all_special_ids, key=ref.all_special_ids.index)
    for text in PARITY_STRINGS:
        assert ref(text).input_ids == ours.encode(text) == again.encode(text)
    assert dict(ref(TEXTS, padding=True, truncation=True)) == dict(
        again(TEXTS, padding=True, truncation=True)
    )
    assert not list((tmp_path / "saved").glob(".*"))


@pytest.mark.reference
def test_save_vocabulary_matches_reference(tokenizers, tmp_path):
    ours, ref = tokenizers
    (mine,) = ours.save_vocabulary(tmp_path, filename_prefix="x")
    assert mine == str(tmp_path / "x-sentencepiece.bpe.model")
    (tmp_path / "ref").mkdir()
    (theirs,) = ref.save_vocabulary(str(tmp_path / "ref"), filename_prefix="x")
    assert Path(mine).read_bytes() == Path(theirs).read_bytes()
    with pytest.raises(XGLMError, match="is not a directory"):
        ours.save_vocabulary(tmp_path / "missing")


def test_from_pretrained_reads_tokenizer_config(tiny_checkpoint, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(model_max_length=5, truncation_side="left")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = XGLMTokenizer.from_pretrained(folder)
    assert tok(TEXTS[0], truncation=True).input_ids == [2, *tok.encode(TEXTS[0])[-4:]]
    assert XGLMTokenizer.from_pretrained(folder, model_max_length=None).model_max_length is None


@pytest.mark.reference
def test_subword_regularisation_matches_reference(tiny_checkpoint, transformers):
    kwargs = {"enable_sampling": True, "nbest_size": -1, "alpha": 0.5}
    ours = XGLMTokenizer.from_pretrained(tiny_checkpoint, sp_model_kwargs=kwargs)
    ref = transformers.XGLMTokenizer.from_pretrained(tiny_checkpoint, sp_model_kwargs=kwargs)
    text = "The quick brown fox jumps over the lazy dog"
    spm.set_random_generator_seed(7)
    sampled = [ours.encode(text) for _ in range(6)]
    spm.set_random_generator_seed(7)
    assert sampled == [ref(text).input_ids for _ in range(6)]
    assert len({tuple(ids) for ids in sampled}) > 1
    assert {ours.decode(ids, skip_special_tokens=True) for ids in sampled} == {text}


@pytest.mark.parametrize(
    "args, kwargs, param, message",
    [
        ((TEXTS,), {"return_tensors": "np"}, "padding", "different lengths"),
        ((TEXTS,), {"return_tensors": "pt", "padding": True}, "return_tensors", "return_tensors='pt'"),
        ((TEXTS,), {"padding": "sideways"}, "padding", "padding='sideways'"),
        ((TEXTS,), {"truncation": "middle"}, "truncation", "truncation='middle'"),
        ((TEXTS,), {"padding": True, "padding_side": "up"}, "padding_side", "padding_side='up'"),
        ((TEXTS[0],), {"truncation": "only_second", "max_length": 3}, "truncation", "needs a text_pair"),
        (
            (TEXTS[0], PAIRS[0]),
            {"truncation": "only_second", "max_length": 3},
            "max_length",
            "second sequence has only",
        ),
        ((TEXTS[0],), {"truncation": True, "max_length": 1}, "max_length", "first sequence has only"),
        ((TEXTS, PAIRS[:2]), {}, "text_pair", "text_pair must match text"),
        ((TEXTS, PAIRS[0]), {}, "text_pair", "text_pair must match text"),
        (([1, 2],), {}, "text", "text must be a string or a list of strings"),
        (
            (TEXTS,),
            {"padding": True, "truncation": True, "max_length": 9, "pad_to_multiple_of": 4},
            "max_length",
            "multiple",
        ),
    ],
)
def test_bad_call_arguments_are_errors_naming_the_parameter(tiny_checkpoint, args, kwargs, param, message):
    tok = XGLMTokenizer.from_pretrained(tiny_checkpoint)
    with pytest.raises(XGLMError, match=message) as error:
        tok(*args, **kwargs)
    assert error.value.param == param


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_bad_tokenizer_config_is_a_clear_error(tiny_checkpoint, tmp_path, content):
    shutil.copytree(tiny_checkpoint, tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer_config.json").write_text(content)
    with pytest.raises(XGLMError, match="tokenizer_config.json"):
        XGLMTokenizer.from_pretrained(tmp_path / "tok")
