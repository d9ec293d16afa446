"""Batches of token ids for the model: pairs, truncation, padding and the attention mask.

The rules are those of transformers 4.56's `PreTrainedTokenizerBase.__call__` for a slow tokenizer; where
transformers only logs an error and returns an over-long sequence, this raises XGLMError instead.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..errors import XGLMError

PADDING = {False: None, "do_not_pad": None, True: "longest", "longest": "longest", "max_length": "max_length"}
TRUNCATION = {
    None: None,
    False: None,
    "do_not_truncate": None,
    True: "longest_first",
    "longest_first": "longest_first",
    "only_first": "only_first",
    "only_second": "only_second",
}


class BatchEncoding(dict):
    """A dict of `input_ids` and `attention_mask` that also reads as attributes (`enc.input_ids`)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _strategy(table: dict, value, flag: str) -> str | None:
    try:
        return table[value]
    except (KeyError, TypeError):
        choices = ", ".join(repr(k) for k in table)
        raise XGLMError(f"{flag}={value!r} is not supported; use one of {choices}", param=flag) from None


def resolve_lengths(padding, truncation, max_length, model_max_length, pad_to_multiple_of):
    """The padding and truncation strategies and the length they work to, as transformers decides them."""
    # As transformers: a max_length on its own switches truncation on.
    if max_length is not None and padding is False and truncation is None:
        truncation = "longest_first"
    pad = _strategy(PADDING, padding, "padding")
    cut = _strategy(TRUNCATION, truncation, "truncation")
    if max_length is None:
        if pad == "max_length" and model_max_length is None:
            pad = None
        if cut is not None and model_max_length is None:
            cut = None
        max_length = model_max_length if (pad == "max_length" or cut is not None) else None
    if cut and pad and pad_to_multiple_of and max_length is not None and max_length % pad_to_multiple_of:
        raise XGLMError(
            f"max_length={max_length} is not a multiple of pad_to_multiple_of={pad_to_multiple_of}; "
            "truncation and padding together need it to be",
            param="max_length",
        )
    return pad, cut, max_length


def truncate(ids: list[int], pair: list[int] | None, remove: int, strategy: str, side: str):
    """Drop `remove` ids from `ids` and/or `pair` following `strategy` ('longest_first', 'only_first',
    'only_second') from the `side` ('right' or 'left')."""

    def cut(seq: list[int], n: int) -> list[int]:
        if n <= 0:
            return seq
        return seq[:-n] if side == "right" else seq[n:]

    if strategy == "only_first" or (strategy == "longest_first" and pair is None):
        if len(ids) <= remove:
            raise XGLMError(
                f"cannot truncate to max_length: {remove} ids must go but the first sequence has only "
                f"{len(ids)}; raise max_length or use truncation='longest_first' or 'only_second'",
                param="max_length",
            )
        return cut(ids, remove), pair
    if strategy == "only_second":
        if pair is None:
            raise XGLMError(
                "truncation='only_second' needs a text_pair; single texts use 'longest_first'",
                param="truncation",
            )
        if len(pair) <= remove:
            raise XGLMError(
                f"cannot truncate to max_length: {remove} ids must go but the second sequence has only "
                f"{len(pair)}; raise max_length or use truncation='longest_first' or 'only_first'",
                param="max_length",
            )
        return ids, cut(pair, remove)
    # longest_first on a pair: first even out the lengths, then take the rest alternately, the longer
    # sequence (the first on a tie) giving the odd one.
    first = min(abs(len(pair) - len(ids)), remove)
    rest = remove - first
    if len(ids) > len(pair):
        from_ids, from_pair = first + rest // 2, rest - rest // 2
    else:
        from_ids, from_pair = rest // 2, first + rest - rest // 2
    return cut(ids, from_ids), cut(pair, from_pair)


def pad_rows(rows: list[list[int]], length: int, pad_id: int, side: str, with_mask: bool) -> dict:
    """`input_ids` padded with `pad_id` to `length` on `side`, and the matching 1/0 `attention_mask`."""
    if side not in ("left", "right"):
        raise XGLMError(
            f"padding_side={side!r} is not supported; use 'left' or 'right'", param="padding_side"
        )
    ids, masks = [], []
    for row in rows:
        extra = max(length - len(row), 0)
        fill, ones = [pad_id] * extra, [1] * len(row)
        ids.append(fill + row if side == "left" else row + fill)
        masks.append([0] * extra + ones if side == "left" else ones + [0] * extra)
    return {"input_ids": ids, "attention_mask": masks} if with_mask else {"input_ids": ids}


def as_tensors(data: dict, return_tensors: str | None) -> dict:
    """Lists of lists as `np` (int64) or `mlx` (int32) arrays; None keeps Python lists."""
    if return_tensors is None:
        return data
    if return_tensors not in ("np", "mlx"):
        raise XGLMError(
            f"return_tensors={return_tensors!r} is not supported; use None, 'np' or 'mlx'",
            param="return_tensors",
        )
    lengths = {len(row) for row in data["input_ids"]}
    if len(lengths) > 1:
        raise XGLMError(
            "the sequences have different lengths, so they cannot form one array; pass padding=True "
            "(and truncation=True to cap them)",
            param="padding",
        )
    convert = np.array if return_tensors == "np" else mx.array
    return {key: convert(value) for key, value in data.items()}


def encode_batch(
    tokenizer,
    text,
    text_pair,
    *,
    add_special_tokens: bool,
    padding,
    truncation,
    max_length: int | None,
    pad_to_multiple_of: int | None,
    padding_side: str,
    return_tensors: str | None,
    return_attention_mask: bool,
) -> BatchEncoding:
    """`XGLMTokenizer.__call__`: encode, truncate, add special tokens, pad, convert (see its docstring)."""
    batched = not isinstance(text, str)
    texts = list(text) if batched else [text]
    if not all(isinstance(t, str) for t in texts):
        raise XGLMError("text must be a string or a list of strings", param="text")
    pairs = None
    if text_pair is not None:
        pairs = list(text_pair) if batched else [text_pair]
        if batched == isinstance(text_pair, str) or len(pairs) != len(texts):
            raise XGLMError(
                "text_pair must match text: a string for a string, a list as long for a list",
                param="text_pair",
            )
    pad, cut, length = resolve_lengths(
        padding, truncation, max_length, tokenizer.model_max_length, pad_to_multiple_of
    )
    rows = []
    for i, t in enumerate(texts):
        ids = tokenizer.encode(t, add_special_tokens=False)
        pair = None if pairs is None else tokenizer.encode(pairs[i], add_special_tokens=False)
        extra = tokenizer.num_special_tokens_to_add(pair is not None) if add_special_tokens else 0
        total = len(ids) + (len(pair) if pair is not None else 0) + extra
        if cut and length and total > length:
            ids, pair = truncate(ids, pair, total - length, cut, tokenizer.truncation_side)
        if add_special_tokens:
            rows.append(tokenizer.build_inputs_with_special_tokens(ids, pair))
        else:
            rows.append(ids + (pair or []))
    if pad == "longest":
        length = max((len(r) for r in rows), default=0)
    if pad and pad_to_multiple_of and length % pad_to_multiple_of:
        length += pad_to_multiple_of - length % pad_to_multiple_of
    data = pad_rows(rows, length if pad else 0, tokenizer.pad_token_id, padding_side, return_attention_mask)
    data = as_tensors(data, return_tensors)
    if not batched and return_tensors is None:
        data = {key: value[0] for key, value in data.items()}
    return BatchEncoding(data)
