"""The causal language-modelling loss, as transformers 4.56 computes it (`ForCausalLMLoss`)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..errors import XGLMError

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
    labels = labels if isinstance(labels, mx.array) else mx.array(labels)
    if labels.shape != logits.shape[:-1]:
        raise XGLMError(
            f"labels has shape {tuple(labels.shape)}; it must match the input: {tuple(logits.shape[:-1])}"
        )
    vocab_size = logits.shape[-1]
    values = np.asarray(labels)
    bad = (values != ignore_index) & ((values < 0) | (values >= vocab_size))
    if bad.any():
        raise XGLMError(
            f"labels hold {int(values[bad][0])}; use token ids in 0..{vocab_size - 1} or {ignore_index} "
            "for positions without a loss"
        )
    pad = mx.full((*labels.shape[:-1], 1), ignore_index, dtype=labels.dtype)
    targets = mx.concatenate([labels[..., 1:], pad], axis=-1)
    counted = targets != ignore_index
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, mx.where(counted, targets, 0)[..., None], axis=-1)[..., 0]
    nll = mx.where(counted, mx.logsumexp(logits, axis=-1) - picked, 0.0)
    denominator = counted.sum() if num_items_in_batch is None else num_items_in_batch
    return nll.sum() / denominator
