"""Log-probabilities of target tokens and the summed cross-entropy, over XGLM's 256,008-word vocabulary.

Every caller that scores positions (score, loglikelihood, perplexity, the lm-eval backend, the server's
echoed log-probabilities, the training loss) comes here with final hidden states and a head. The head runs
`CHUNK` positions at a time, so [positions, vocab_size] logits never exist whole, and the cross-entropy's
backward (softmax minus one-hot, through the head) is done chunk by chunk as well.

Why not `mx.logsumexp`: MLX's CPU `exp` is scalar code, about 10x slower than numpy's vectorized one
(256 x 256,008 floats: 3.6 s against 0.35 s), and the vocabulary-wide exp is most of a scoring pass. On
the CPU the exp and the sums run in numpy, in float32, on the evaluated logits, their rows split over the
cores (elementwise.py's `in_parallel`); numpy's pairwise sums are also closer to a float64 log-sum-exp
than MLX's. On Metal and CUDA MLX's own ops are fast and stay.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..settings import on_gpu
from .elementwise import in_parallel

# Positions per head matmul: bounds the [positions, vocab_size] float32 logits held at once (256 x 256008
# floats, 262 MB). benchmarks/lora_train.py at 564M widths: a step 0.89x as long as with 128 (fewer, larger
# matmuls; 6 alternating steps in one process), peak memory 2.17 GB against 2.04 GB.
CHUNK = 256
# Rows per numpy pass inside a chunk: 16 rows of 256k floats stay in cache between the exp and the sum.
_ROWS = 16


def _on_cpu() -> bool:
    return not on_gpu()


def _detached(a: mx.array) -> mx.array:
    """`a` evaluated, as a new array outside any graph. Under `mx.grad` an evaluated array keeps its graph
    (MLX may differentiate through it), so each chunk's logits would live on until the backward pass; the
    custom function below differentiates its chunks itself and needs none of that. (Through float32:
    numpy has no bfloat16.)"""
    return mx.array(np.array(a.astype(mx.float32))).astype(a.dtype)


def _logits(head: Callable, hidden: mx.array) -> tuple[mx.array, mx.Dtype]:
    """The head's logits of `hidden`, evaluated, in float32; and the dtype the head gave them."""
    logits = head(hidden)
    dtype = logits.dtype
    logits = logits.astype(mx.float32)
    mx.eval(logits)
    return logits, dtype


def _scores(
    logits: mx.array, targets: mx.array, gradient: bool = False
) -> tuple[mx.array, mx.array, mx.array | None]:
    """log p(target) [n] under `logits` [n, V] (float32, evaluated) and each row's log-sum-exp [n]; with
    `gradient`, also softmax minus the targets' one-hot rows (the cross-entropy's gradient in the logits),
    which on the CPU is written over `logits`: pass an array no one else holds."""
    if not _on_cpu():
        lse = mx.logsumexp(logits, axis=-1)
        picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
        if not gradient:
            return picked - lse, lse, None
        onehot = mx.arange(logits.shape[-1])[None] == targets[:, None]
        return picked - lse, lse, mx.softmax(logits, axis=-1, precise=True) - onehot
    # numpy views of an evaluated MLX array share its memory, so the softmax can be written in place:
    # mx.array(ndarray) would copy element by element, twice as slow as numpy's exp itself.
    x = np.asarray(logits)
    rows, t = np.arange(x.shape[0]), np.asarray(targets)
    picked = x[rows, t]
    lse = np.empty(x.shape[0], np.float32)

    def work(first: int, last: int) -> None:
        scratch = None if gradient else np.empty((min(_ROWS, last - first), x.shape[1]), np.float32)
        for i in range(first, last, _ROWS):
            block = x[i : min(i + _ROWS, last)]
            out = block if gradient else scratch[: block.shape[0]]
            top = block.max(axis=1, keepdims=True)
            np.subtract(block, top, out=out)
            np.exp(out, out=out)
            total = out.sum(axis=1, keepdims=True)
            lse[i : i + block.shape[0]] = top[:, 0] + np.log(total[:, 0])
            if gradient:
                np.divide(out, total, out=out)

    in_parallel(x.shape[0], work, _ROWS)
    if gradient:
        x[rows, t] -= 1.0
    return mx.array(picked - lse), mx.array(lse), logits if gradient else None


def _chunk_logprobs(head: Callable, hidden: mx.array, t: mx.array, greedy: bool, top: int) -> dict:
    logits, _ = _logits(head, hidden)
    logprobs, lse, _ = _scores(logits, t)
    scored = {"logprobs": logprobs}
    if greedy:
        scored["greedy"] = mx.argmax(logits, axis=-1) == t
    if top:
        ids = mx.argpartition(-logits, kth=top - 1, axis=-1)[:, :top]
        values = mx.take_along_axis(logits, ids, axis=-1)
        order = mx.argsort(-values, axis=-1)
        scored["top_ids"] = mx.take_along_axis(ids, order, axis=-1)
        scored["top_logprobs"] = mx.take_along_axis(values, order, axis=-1) - lse[:, None]
    mx.eval(scored)
    return {name: np.array(value) for name, value in scored.items()}


def target_logprobs(
    head: Callable, hidden: mx.array, targets: mx.array, greedy: bool = False, top: int = 0
) -> dict[str, np.ndarray]:
    """log p(target) for each row of `hidden` [P, d_model] under the logits `head(hidden)`, in float32.

    Returns numpy arrays: `logprobs` [P]; with `greedy`, `greedy` [P] (whether the target is the argmax);
    with `top` > 0, `top_ids` and `top_logprobs` [P, top], each row's likeliest tokens, likeliest first.
    """
    parts: dict[str, list] = {"logprobs": [], "greedy": [], "top_ids": [], "top_logprobs": []}
    for start in range(0, hidden.shape[0], CHUNK):
        scored = _chunk_logprobs(
            head, hidden[start : start + CHUNK], targets[start : start + CHUNK], greedy, top
        )
        for name, value in scored.items():
            parts[name].append(value)
    empty = {"logprobs": np.float32, "greedy": bool, "top_ids": np.int32, "top_logprobs": np.float32}
    wanted = {"logprobs": True, "greedy": greedy, "top_ids": top, "top_logprobs": top}
    return {
        name: np.concatenate(parts[name]) if parts[name] else np.zeros((0,), dtype)
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

    def chunk(rows: mx.array, t: mx.array, params, with_grads: bool) -> tuple[mx.array, list[mx.array]]:
        """The nll sum of `rows` (evaluated) and, with `with_grads`, its gradients in rows and params."""
        # A copy outside the graph: then the logits are this function's own, and the softmax can go over them.
        rows = _detached(rows)
        logits, dtype = _logits(lambda x: run_head(x, *params), rows)
        logprobs, _, d_logits = _scores(logits, t, gradient=with_grads)
        nll = -logprobs.sum()
        mx.eval(nll)
        del logits
        if not with_grads:
            return nll, []
        _, d_inputs = mx.vjp(run_head, [rows, *params], [d_logits.astype(dtype)])
        return nll, [_detached(d) for d in d_inputs]

    def chunked(h: mx.array, params, with_grads: bool) -> list[mx.array]:
        """[nll sum] or [nll sum, d hidden, *d params], the gradients those of the nll sum."""
        params = [_detached(p) for p in params]
        total, d_hidden, d_params = mx.array(0.0), [], [mx.zeros_like(p) for p in params]
        for start in range(0, h.shape[0], CHUNK):
            nll, d_inputs = chunk(
                h[start : start + CHUNK], targets[start : start + CHUNK], params, with_grads
            )
            total = total + nll
            if with_grads:
                d_hidden.append(d_inputs[0])
                d_params = [a + b for a, b in zip(d_params, d_inputs[1:], strict=True)]
                mx.eval(d_params)
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
