"""Masks and positions: one module turns attention masks or left padding plus cache offsets into both."""

import mlx.core as mx
import numpy as np

from mlx_xglm.model.batch_cache import BatchKVCache
from mlx_xglm.model.masks import left_padding_mask, left_padding_positions, padding_positions


def test_pads_get_position_minus_one_and_real_tokens_count_from_zero():
    attention_mask = mx.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = padding_positions(attention_mask, offset=0)
    assert positions.ids.tolist() == [[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert positions.end == 5
    assert padding_positions(attention_mask, offset=3).ids.tolist() == [[1, 2], [3, 4]]


def test_left_padding_mask_hides_pads_and_the_future_but_pads_see_themselves():
    mask = np.array(left_padding_mask(mx.array([2, 0]), offset=0, length=4, window=None, dtype=mx.float32))
    allowed = mask[:, 0] == 0
    assert allowed[0].tolist() == [
        [True, False, False, False],
        [False, True, False, False],
        [False, False, True, False],
        [False, False, True, True],
    ]
    assert allowed[1].tolist() == np.tril(np.ones((4, 4), bool)).tolist()


def test_window_keeps_the_most_recent_positions_only():
    mask = np.array(left_padding_mask(mx.array([0]), offset=3, length=2, window=3, dtype=mx.float32))
    assert (mask[0, 0] == 0).tolist() == [[False, True, True, True, False], [False, False, True, True, True]]


def test_left_padding_positions_follow_each_rows_shift():
    positions = left_padding_positions(mx.array([1, 0]), mx.array([-1, 5]), offset=0, length=3, end=8)
    assert positions.ids.tolist() == [[-1, 0, 1], [5, 6, 7]]


def test_batch_cache_keeps_positions_when_rows_join_and_leave():
    a = BatchKVCache([1, 0])
    a.update_and_fetch(mx.zeros((2, 1, 3, 4)), mx.zeros((2, 1, 3, 4)))
    b = BatchKVCache([0])
    b.update_and_fetch(mx.ones((1, 1, 5, 4)), mx.ones((1, 1, 5, 4)))
    a.extend(b)
    assert a.offset == 5 and a.left_padding == [3, 2, 0]
    assert a.make_positions(1).ids.tolist() == [[2], [3], [5]]
    a.filter([2, 0])
    # The columns only the removed row needed are dropped.
    assert a.offset == 5 and a.left_padding == [0, 3]
    assert a.make_positions(1).ids.tolist() == [[5], [2]]
    a.filter([1])
    assert a.offset == 2 and a.left_padding == [0] and a.make_positions(1).start == 2
    assert a.make_mask(1, mx.float32) is None
