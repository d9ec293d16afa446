"""The streaming detokenizer: text out as soon as it is final, equal in the end to decode."""

import numpy as np
import pytest
from xglm_fixtures import TEXT_FILE

from mlx_xglm import XGLMError, XGLMTokenizer
from mlx_xglm.tokenization.detokenizer import StreamingDetokenizer


@pytest.fixture(scope="module")
def tokenizer(sp_model):
    return XGLMTokenizer(sp_model)


def id_sequences(tokenizer):
    """Encoded lines of the multilingual corpus, then random ids (special ones included)."""
    lines = [line for line in TEXT_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    for line in lines:
        yield tokenizer.encode(line)
    rng = np.random.default_rng(0)
    for _ in range(300):
        yield rng.integers(0, tokenizer.vocab_size, size=int(rng.integers(1, 40))).tolist()


def lines_text(tokenizer, ids):
    """What newline mode shows: the decoded lines between </s> tokens, without trailing breaks."""
    lines, line = [], []
    for i in ids:
        if i == tokenizer.eos_token_id:
            lines.append(line)
            line = []
        else:
            line.append(i)
    lines.append(line)
    return "\n".join(tokenizer.decode(part, skip_special_tokens=True) for part in lines).rstrip("\n")


def test_streamed_text_is_final_after_every_token_and_equals_decode(tokenizer):
    count = 0
    for ids in id_sequences(tokenizer):
        detok = StreamingDetokenizer(tokenizer)
        streamed = ""
        for k, token in enumerate(ids):
            detok.add_token(token)
            streamed += detok.last_segment
            # Everything decode of the prefix shows is already out: nothing final is held back.
            assert streamed == tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
        detok.finalize()
        streamed += detok.last_segment
        assert streamed == detok.text == tokenizer.decode(ids, skip_special_tokens=True)
        assert "\ufffd" not in streamed
        count += 1
    assert count > 300


def test_multilingual_lines_stream_piece_by_piece(tokenizer):
    line = "Быстрая коричневая лиса, 敏捷的棕色狐狸 and القاهرة."
    ids = tokenizer.encode(line, add_special_tokens=False)
    detok = StreamingDetokenizer(tokenizer)
    segments = []
    for token in ids:
        detok.add_token(token)
        segments.append(detok.last_segment)
    assert "".join(segments) == tokenizer.decode(ids)
    assert sum(1 for s in segments if s) > len(ids) // 2


def test_leading_space_of_first_piece_is_dropped(tokenizer):
    ids = tokenizer.encode(" hello world", add_special_tokens=False)
    detok = StreamingDetokenizer(tokenizer)
    detok.add_token(ids[0])
    assert not detok.last_segment.startswith(" ")


def test_newline_mode_shows_eos_as_line_breaks(tokenizer):
    a = tokenizer.encode("one two", add_special_tokens=False)
    b = tokenizer.encode("three", add_special_tokens=False)
    eos = tokenizer.eos_token_id
    detok = StreamingDetokenizer(tokenizer, newlines="eos")
    for token in [eos, *a, eos, eos, *b, eos]:
        detok.add_token(token)
    detok.finalize()
    assert detok.text == "\none two\n\nthree"


def test_newline_mode_equals_decoded_lines_on_random_ids(tokenizer):
    rng = np.random.default_rng(1)
    for ids in id_sequences(tokenizer):
        # Sprinkle in extra </s> tokens so that lines, blank lines and leading breaks all occur.
        ids = [int(i) for i in ids for i in ([i, 2] if rng.random() < 0.15 else [i])]
        detok = StreamingDetokenizer(tokenizer, newlines="eos")
        for k, token in enumerate(ids):
            detok.add_token(token)
            assert detok.text == lines_text(tokenizer, ids[: k + 1])
        detok.finalize()
        assert detok.text == lines_text(tokenizer, ids)


def test_bad_newline_mode_is_rejected(tokenizer):
    with pytest.raises(XGLMError, match="newlines") as error:
        StreamingDetokenizer(tokenizer, newlines="crlf")
    assert error.value.param == "newlines"
