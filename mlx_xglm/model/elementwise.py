"""GELU and softmax for the decoder layers, their exponentials done by numpy on MLX's CPU backend.

MLX's CPU backend computes `exp`, `erf` and `tanh` one element at a time: over 4 x 128 x 4,096 float32
values (a LoRA batch's fc1 output at 564M widths) `nn.gelu` takes 64 ms and its backward 40 ms more, where
numpy's vectorized exp needs 3 ms; the attention's softmax over [4, 16, 128, 128] takes 25 ms. Those two
were most of the gap between a LoRA step's layers and torch's: forward and backward of 4 such layers took
1.29 s against torch's 0.86 s, and take 0.99 s through this module. Products and sums are vectorized in
MLX too: only the transcendental part moves.

On the CPU, arrays of at least `LARGE` elements go through numpy, in float32, in blocks that stay in cache,
split over the cores (`in_parallel`: numpy's loops let go of the GIL, and MLX is idle meanwhile). Smaller
arrays (a decoding step's) and everything on a GPU use MLX's own ops, which are fast there. Each is a
custom function with its own backward, so training gets the speed as well. GELU is the exact (erf)
one, through the complementary error function of Numerical Recipes' `erfcc` (fractional error below
1.2e-7): within 4e-7 of a float64 GELU, closer than `nn.gelu` itself here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..settings import on_gpu

# Elements from which the CPU routes through numpy: below this MLX's own ops cost less than the handover.
LARGE = 1 << 16
# Elements per numpy pass: three float32 blocks of this size stay in a core's L2 cache.
_BLOCK = 1 << 17
# erfc(z) = t * exp(-z^2 + P(t)) with t = 1 / (1 + z/2), for z >= 0; P's coefficients, constant first.
_ERFC = [
    np.float32(c)
    for c in (
        -1.26551223,
        1.00002368,
        0.37409196,
        0.09678418,
        -0.18628806,
        0.27886807,
        -1.13520398,
        1.48851587,
        -0.82215223,
        0.17087277,
    )
]
_SQRT_HALF = np.float32(1 / math.sqrt(2))
_INV_SQRT_2PI = np.float32(1 / math.sqrt(2 * math.pi))


_pool: ThreadPoolExecutor | None = None


def in_parallel(count: int, work: Callable[[int, int], None], unit: int = 1) -> None:
    """`work(start, stop)` over `range(count)` cut into one contiguous piece per core (a multiple of
    `unit` long), the pieces run at once on a pool of threads; returns when all are done."""
    global _pool
    cores = os.cpu_count() or 1
    piece = -(-count // cores)
    piece = -(-piece // unit) * unit
    if cores == 1 or count <= piece:
        work(0, count)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(cores, thread_name_prefix="mlx-xglm-numpy")
    for future in [_pool.submit(work, s, min(s + piece, count)) for s in range(0, count, piece)]:
        future.result()


def _vectorized(x: mx.array) -> bool:
    return x.size >= LARGE and not on_gpu()


def _numpy(x: mx.array) -> np.ndarray | None:
    """`x` evaluated, as a float32 numpy array (a view where it already is one: numpy has no bfloat16);
    None while MLX is tracing a function (`mx.compile`), where nothing may be evaluated: the caller then
    uses MLX's own ops, which trace."""
    x = x if x.dtype == mx.float32 else x.astype(mx.float32)
    try:
        mx.eval(x)
    except ValueError:  # "[eval] Attempting to eval an array during function transformations ..."
        return None
    return np.asarray(x)


def _gelu_numpy(x: np.ndarray, derivative: bool) -> np.ndarray:
    """GELU(x) = x * Phi(x) or, with `derivative`, Phi(x) + x * phi(x), for float32 `x`, in float32.

    Written as relu(x) - |x| erfc(|x| / sqrt 2) / 2, which needs no branch on the sign.
    """
    flat = x.reshape(-1)
    out = np.empty_like(flat)

    def work(first: int, last: int) -> None:
        size = min(_BLOCK, last - first)
        t, p, z = (np.empty(size, np.float32) for _ in range(3))
        for start in range(first, last, _BLOCK):
            xb = flat[start : min(start + _BLOCK, last)]
            n = xb.size
            tb, pb, zb, ob = t[:n], p[:n], z[:n], out[start : start + n]
            np.abs(xb, out=zb)
            zb *= _SQRT_HALF
            np.multiply(zb, 0.5, out=tb)
            tb += 1
            np.reciprocal(tb, out=tb)
            np.multiply(tb, _ERFC[-1], out=pb)
            for c in _ERFC[-2:0:-1]:
                pb += c
                pb *= tb
            pb += _ERFC[0]
            zb *= zb  # z^2 = x^2 / 2
            if not derivative:
                pb -= zb
                np.exp(pb, out=pb)
                pb *= tb  # erfc(|x| / sqrt 2)
                np.abs(xb, out=ob)
                pb *= ob
                pb *= 0.5
                np.maximum(xb, 0, out=ob)
                ob -= pb
                continue
            np.negative(zb, out=zb)
            np.exp(zb, out=zb)  # exp(-x^2 / 2)
            np.exp(pb, out=pb)
            pb *= tb
            pb *= zb  # erfc(|x| / sqrt 2)
            np.subtract(1, pb, out=pb)
            np.copysign(pb, xb, out=pb)
            pb *= 0.5
            pb += 0.5  # Phi(x)
            np.multiply(xb, zb, out=ob)
            ob *= _INV_SQRT_2PI
            ob += pb

    in_parallel(flat.size, work, _BLOCK)
    return out.reshape(x.shape)


@mx.custom_function
def _gelu_cpu(x: mx.array) -> mx.array:
    values = _numpy(x)
    if values is None:
        return nn.gelu(x)
    return mx.array(_gelu_numpy(values, False)).astype(x.dtype)


@_gelu_cpu.vjp
def _gelu_cpu_vjp(x, cotangent, output):
    values = _numpy(x)
    if values is None:
        return mx.vjp(nn.gelu, [x], [cotangent])[1][0]
    derivative = mx.array(_gelu_numpy(values, True))
    return (cotangent * derivative).astype(x.dtype)


def gelu(x: mx.array) -> mx.array:
    """The exact GELU, x * Phi(x), as `nn.gelu` and transformers' "gelu"."""
    return _gelu_cpu(x) if _vectorized(x) else nn.gelu(x)


def _softmax_numpy(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of float32 `x`, in float32, a block of rows at a time."""
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    step = max(1, _BLOCK // rows.shape[1])

    def work(first: int, last: int) -> None:
        for start in range(first, last, step):
            stop = min(start + step, last)
            block, ob = rows[start:stop], out[start:stop]
            with np.errstate(invalid="ignore"):  # a row masked whole gives NaN, as mx.softmax's does
                np.subtract(block, block.max(axis=1, keepdims=True), out=ob)
            np.exp(ob, out=ob)
            ob /= ob.sum(axis=1, keepdims=True)

    in_parallel(rows.shape[0], work, step)
    return out.reshape(x.shape)


@mx.custom_function
def _softmax_cpu(x: mx.array) -> mx.array:
    values = _numpy(x)
    if values is None:
        return mx.softmax(x, axis=-1, precise=True)
    return mx.array(_softmax_numpy(values)).astype(x.dtype)


@_softmax_cpu.vjp
def _softmax_cpu_vjp(x, cotangent, output):
    g = cotangent * output
    return g - output * g.sum(axis=-1, keepdims=True)


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis, computed in float32 (`mx.softmax(..., precise=True)`)."""
    return _softmax_cpu(x) if _vectorized(x) else mx.softmax(x, axis=-1, precise=True)
