"""Log-probabilities of target tokens and the summed cross-entropy, over XGLM's 256,008-word vocabulary.

Every caller that scores positions (score, loglikelihood, perplexity, the lm-eval backend, the server's
echoed log-probabilities, the training loss) comes here with final hidden states and a head. The head runs
`CHUNK` positions at a time, so [positions, vocab_size] logits never exist whole, and the cross-entropy's
backward (softmax minus one-hot, through the head) is done chunk by chunk as well.

Why not `mx.logsumexp`: MLX's CPU `exp` is scalar code, about 10x slower than numpy's vectorized one
(256 x 256,008 floats: 3.6 s against 0.35 s), and the vocabulary-wide exp is most of a scoring pass. On
the CPU the exp and the sums run in numpy, in float32, on the evaluated logits (numpy's pairwise sums
are also closer to a float64 log-sum-exp than MLX's). On Metal and CUDA MLX's own ops are fast and stay.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

# Positions per head matmul: bounds the [positions, vocab_size] float32 logits held at once (256 x 256008).
CHUNK = 256
# Rows per numpy pass inside a chunk: 16 rows of 256k floats stay in cache between the exp and the sum.
_ROWS = 16


def _on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def _logits(head: Callable, hidden: mx.array) -> tuple[mx.array, mx.Dtype]:
    """The head's logits of `hidden`, evaluated, in float32; and the dtype the head gave them."""
    logits = head(hidden)
    dtype = logits.dtype
    logits = logits.astype(mx.float32)
    mx.eval(logits)
    return logits, dtype


def _log_softmax(logits: mx.array, targets: mx.array | None = None) -> tuple[mx.array, mx.array | None]:
    """log-sum-exp of each row of `logits` [n, V] (float32, evaluated); with `targets` [n], also
    softmax(logits) minus the targets' one-hot rows: the cross-entropy's gradient in the logits."""
    if not _on_cpu():
        if targets is None:
            return mx.logsumexp(logits, axis=-1), None
        onehot = mx.arange(logits.shape[-1])[None] == targets[:, None]
        return mx.logsumexp(logits, axis=-1), mx.softmax(logits, axis=-1, precise=True) - onehot
    x = np.asarray(logits)
    # numpy writes into a fresh MLX buffer (numpy views of MLX arrays share their memory): this avoids
    # mx.array(ndarray)'s slow element-wise copy, about 2x numpy's exp here.
    out = mx.zeros(logits.shape, mx.float32)
    mx.eval(out)
    e = np.asarray(out)
    lse = np.empty(x.shape[0], np.float32)
    for i in range(0, x.shape[0], _ROWS):
        rows, block = x[i : i + _ROWS], e[i : i + _ROWS]
        top = rows.max(axis=1, keepdims=True)
        np.subtract(rows, top, out=block)
        np.exp(block, out=block)
        total = block.sum(axis=1, keepdims=True)
        lse[i : i + _ROWS] = top[:, 0] + np.log(total[:, 0])
        if targets is not None:
            np.divide(block, total, out=block)
    if targets is None:
        return mx.array(lse), None
    e[np.arange(x.shape[0]), np.asarray(targets)] -= 1.0
    return mx.array(lse), out


def target_logprobs(
    head: Callable, hidden: mx.array, targets: mx.array, greedy: bool = False, top: int = 0
) -> dict[str, np.ndarray]:
    """log p(target) for each row of `hidden` [P, d_model] under the logits `head(hidden)`, in float32.

    Returns numpy arrays: `logprobs` [P]; with `greedy`, `greedy` [P] (whether the target is the argmax);
    with `top` > 0, `top_ids` and `top_logprobs` [P, top], each row's likeliest tokens, likeliest first.
    """
    parts: dict[str, list] = {"logprobs": [], "greedy": [], "top_ids": [], "top_logprobs": []}
    for start in range(0, hidden.shape[0], CHUNK):
        t = targets[start : start + CHUNK]
        logits, _ = _logits(head, hidden[start : start + CHUNK])
        lse, _ = _log_softmax(logits)
        picked = mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        parts["logprobs"].append(picked - lse)
        if greedy:
            parts["greedy"].append(mx.argmax(logits, axis=-1) == t)
        if top:
            ids = mx.argpartition(-logits, kth=top - 1, axis=-1)[:, :top]
            values = mx.take_along_axis(logits, ids, axis=-1)
            order = mx.argsort(-values, axis=-1)
            parts["top_ids"].append(mx.take_along_axis(ids, order, axis=-1))
            parts["top_logprobs"].append(mx.take_along_axis(values, order, axis=-1) - lse[:, None])
        mx.eval([p[-1] for p in parts.values() if p])
    empty = {"logprobs": np.float32, "greedy": bool, "top_ids": np.int32, "top_logprobs": np.float32}
    wanted = {"logprobs": True, "greedy": greedy, "top_ids": top, "top_logprobs": top}
    return {
        name: np.concatenate([np.array(p) for p in parts[name]]) if parts[name] else np.zeros((0,), dtype)
        for name, dtype in empty.items()
        if wanted[name]
    }


def cross_entropy(
    head: Callable, hidden: mx.array, targets: mx.array, module: nn.Module | None = None, grads: bool = True
) -> mx.array:
    """The summed -log p(target) over the rows of `hidden` [P, d_model] under `head(hidden)`, float32.

    Differentiable in `hidden` and in the trainable parameters of `module`, the module whose weights
    `head` reads (None: the head has none). Its backward is softmax minus one-hot through the head, chunk
    by chunk; with `grads` (pass whether a gradient will be asked for, e.g. the model's training mode)
    that work is done in this forward pass, where the softmax is at hand, else the backward recomputes
    the logits. Every target counts: leave ignored positions out before calling.
    """
    flat = tree_flatten(module.trainable_parameters()) if module is not None else []
    names, weights = [name for name, _ in flat], [w for _, w in flat]

    def run_head(h: mx.array, *params: mx.array) -> mx.array:
        if names:
            module.update(tree_unflatten(list(zip(names, params, strict=True))))
        return head(h)

    def chunked(h: mx.array, params, with_grads: bool) -> list[mx.array]:
        """[nll sum] or [nll sum, d hidden, *d params], the gradients those of the nll sum."""
        total, d_hidden, d_params = mx.array(0.0), [], [mx.zeros_like(p) for p in params]
        for start in range(0, h.shape[0], CHUNK):
            rows, t = h[start : start + CHUNK], targets[start : start + CHUNK]
            logits, dtype = _logits(lambda x: run_head(x, *params), rows)
            lse, d_logits = _log_softmax(logits, t if with_grads else None)
            total = total + (lse - mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]).sum()
            if with_grads:
                _, (d_rows, *d_chunk) = mx.vjp(run_head, [rows, *params], [d_logits.astype(dtype)])
                d_hidden.append(d_rows)
                d_params = [a + b for a, b in zip(d_params, d_chunk, strict=True)]
            mx.eval(total, d_hidden, d_params)
        if names:
            module.update(tree_unflatten(list(zip(names, weights, strict=True))))
        if not with_grads:
            return [total]
        return [total, mx.concatenate(d_hidden) if d_hidden else mx.zeros_like(h), *d_params]

    @mx.custom_function
    def summed(h, params):
        return chunked(h, params, grads)

    @summed.vjp
    def summed_vjp(primals, cotangents, outputs):
        h, params = primals
        if len(outputs) == 1:
            outputs = chunked(h, params, True)
        scale = cotangents[0]
        return scale * outputs[1], [scale * d for d in outputs[2:]]

    return summed(hidden, list(weights))[0]
