"""Stop strings are found in text that arrives piece by piece, in time linear in the text."""

from __future__ import annotations

import random
import time

import pytest

from mlx_xglm.decoding.stop_strings import StopStrings


def naive_stop(pieces: list[str], stop: list[str]) -> tuple[str, bool]:
    """The text before the first stop string (earliest to complete), as the whole text shows it."""
    text = ""
    for piece in pieces:
        for char in piece:
            text += char
            for s in stop:
                if s and text.endswith(s):
                    return text[: -len(s)], True
    return text, False


def run(pieces: list[str], stop: list[str]) -> tuple[str, bool]:
    match = StopStrings(stop).match()
    pending, out = "", ""
    for piece in pieces:
        start = match.feed(piece)
        pending += piece
        if start is not None:
            return out + pending[: len(pending) - len(piece) + start], True
        cut = len(pending) - match.held
        out, pending = out + pending[:cut], pending[cut:]
    return out + pending, False


@pytest.mark.parametrize("seed", range(40))
def test_stop_strings_match_the_naive_search(seed):
    rng = random.Random(seed)
    alphabet = "aab"
    stop = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
    text = "".join(rng.choice(alphabet + "c") for _ in range(40))
    cuts = sorted(rng.sample(range(1, 40), 8))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, 40], strict=True)]
    assert run(pieces, stop) == naive_stop(pieces, stop)


def test_a_long_stop_string_costs_linear_time():
    stop = "a" * 300_000 + "b"
    start = time.perf_counter()
    match = StopStrings([stop]).match()
    for _ in range(2000):
        assert match.feed("a" * 100) is None
    assert time.perf_counter() - start < 5  # quadratic holding-back took seconds per piece
    assert match.held == 200_000
