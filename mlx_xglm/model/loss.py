"""The causal language-modelling loss, as transformers 4.56 computes it (`ForCausalLMLoss`)."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import XGLMError
from .logprobs import cross_entropy

IGNORE_INDEX = -100


def causal_lm_loss(
    logits: mx.array,
    labels,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: int | None = None,
) -> mx.array:
    """Cross-entropy of `logits` [B, L, V] against `labels` [B, L] shifted left by one.

    Position t is scored on labels[t + 1]; the last position and labels equal to `ignore_index` count for
    nothing. The result is the mean over counted tokens (NaN when none counts, like torch), or their sum
    divided by `num_items_in_batch` when given (for gradient accumulation). Computed in float32.
    """
    return head_loss(lambda x: x, logits, labels, logits.shape[-1], ignore_index, num_items_in_batch)


def head_loss(
    head: Callable,
    hidden: mx.array,
    labels,
    vocab_size: int,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: int | None = None,
    module: nn.Module | None = None,
    grads: bool = True,
) -> mx.array:
    """`causal_lm_loss` of the logits `head(hidden)`, from `hidden` [B, L, d] without the whole logits.

    Only counted positions go through the head (model/logprobs.py's `cross_entropy`, which takes
    `module` and `grads`); the result and its gradient are those of `causal_lm_loss(head(hidden), ...)`.
    """
    labels = labels if isinstance(labels, mx.array) else mx.array(labels)
    if labels.shape != hidden.shape[:-1]:
        raise XGLMError(
            f"labels has shape {tuple(labels.shape)}; it must match the input: {tuple(hidden.shape[:-1])}"
        )
    values = np.asarray(labels)
    bad = (values != ignore_index) & ((values < 0) | (values >= vocab_size))
    if bad.any():
        raise XGLMError(
            f"labels hold {int(values[bad][0])}; use token ids in 0..{vocab_size - 1} or {ignore_index} "
            "for positions without a loss"
        )
    pad = np.full((*values.shape[:-1], 1), ignore_index, dtype=values.dtype)
    targets = np.concatenate([values[..., 1:], pad], axis=-1).reshape(-1)
    counted = np.flatnonzero(targets != ignore_index)
    total = mx.array(0.0)
    if counted.size:
        rows = hidden.reshape(-1, hidden.shape[-1])[mx.array(counted)]
        total = cross_entropy(head, rows, mx.array(targets[counted]), module, grads)
    denominator = counted.size if num_items_in_batch is None else num_items_in_batch
    return total / denominator
