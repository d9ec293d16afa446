"""Checking token ids where they enter: an id outside the embedding table reads past it (garbage or a crash).

Prompts, requests and `input_ids` are checked once when a user hands them over, never per decoded token:
ids the model samples are always inside the vocabulary.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import mlx.core as mx

from ..errors import XGLMError


def _flat(ids) -> Iterable:
    for item in ids:
        if isinstance(item, list | tuple):
            yield from _flat(item)
        else:
            yield item


def _bounds(ids) -> tuple[int, int] | None:
    """The smallest and largest id (None when there are none); TypeError for a value that is no integer."""
    if isinstance(ids, mx.array):
        if not mx.issubdtype(ids.dtype, mx.integer):
            raise TypeError(f"token ids must be integers, got an array of {ids.dtype}")
        if ids.size == 0:
            return None
        return int(mx.min(ids).item()), int(mx.max(ids).item())
    low = high = None
    for token in _flat(ids):
        if isinstance(token, bool) or not hasattr(token, "__index__"):
            raise TypeError(f"token ids must be integers, got {token!r}")
        token = operator.index(token)
        low = token if low is None or token < low else low
        high = token if high is None or token > high else high
    return None if low is None else (low, high)


def check_token_ids(ids, vocab_size: int, param: str = "input_ids"):
    """`ids` (an `mx.array`, a list, or lists of lists) if every id is in `[0, vocab_size)`; else XGLMError
    naming `param` and the first bad bound. Returns `ids` unchanged."""
    try:
        bounds = _bounds(ids)
    except TypeError as e:
        raise XGLMError(f"{param}: {e}", param=param) from None
    if bounds is None:
        return ids
    low, high = bounds
    bad = low if low < 0 else high if high >= vocab_size else None
    if bad is not None:
        raise XGLMError(
            f"{param} holds token id {bad}, outside this model's vocabulary (0 to {vocab_size - 1})",
            param=param,
        )
    return ids
