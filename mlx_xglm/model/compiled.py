"""Compiled decoding: a layer's cache-free halves, or one whole decoding step of the model.

A small model's decoding is bound by the host's work per token (building the graph, launching kernels),
not by arithmetic; `mx.compile` builds the graph once and fuses its elementwise runs into single kernels.
Inference only: training runs the modules as written.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from ..decoding.cache import KVCache
from .fused import layer_norm, views_in_place
from .masks import Positions

# At inference, a decoding step over plain KV caches runs as one compiled graph (`DecodeStep`), and other
# inputs of at most COMPILE_MAX_LENGTH positions per row (batched steps, speculative checks) run each layer's
# cache-free halves compiled: the host then builds a few nodes per layer instead of dozens, which is what
# bounds a small model's decoding. Longer inputs (prompts) are bound by arithmetic and run as written.
# GPUs only by default: on the CPU backend mx.compile builds every new kernel with the system C++ compiler
# (g++ must be installed; seconds per kernel the first time, SIGINT ignored while it runs, so a Ctrl-C
# could be lost). MLX_XGLM_COMPILE=1 or 0 forces it on or off.
COMPILES = os.environ.get("MLX_XGLM_COMPILE", str(int(mx.default_device() == mx.gpu))) == "1"
COMPILE_STEP = COMPILES
COMPILE_MAX_LENGTH = 8 if COMPILES else 0


def norm(module: nn.LayerNorm, x: mx.array) -> mx.array:
    """A layer's LayerNorm: spelled out for the compiler where compiling is on (see fused.py)."""
    return layer_norm(module, x) if COMPILES else module(x)


def scale_and_add(embeddings: mx.array, scale: float, positions: mx.array) -> mx.array:
    # One kernel instead of a multiply and an add at every step, where compiling is on.
    return embeddings * scale + positions


def final_layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    # The fast LayerNorm is a dozen small ops; compiled, a few.
    return mx.fast.layer_norm(x, weight, bias, eps)


if COMPILES:
    scale_and_add = mx.compile(scale_and_add, shapeless=True)
    final_layer_norm = mx.compile(final_layer_norm)


class CompiledCalls:
    """Methods compiled over the arrays of the modules each one reads.

    `calls` pairs each method with those modules. The arrays go in as explicit arguments, gathered at
    every call, so new weights are always read; while tracing, the tracers stand in for them inside the
    real modules, so the compiled graph is exactly the modules' own math, whatever they are (quantized,
    adapted). A replaced submodule or a changed set of arrays makes `valid()` false, and the caller
    builds anew.
    """

    def __init__(self, owner: nn.Module, calls):
        modules = [m for _, m in owner.named_modules()]
        self.children = [
            (parent, key, child)
            for parent in modules
            for key, child in parent.items()
            if isinstance(child, nn.Module)
        ]
        self.sizes = [(m, len(m)) for m in modules]
        self.calls = []
        for method, owners in calls:
            owned = [m for owner in owners for _, m in owner.named_modules()]
            slots = [(m, k) for m in owned for k, v in m.items() if isinstance(v, mx.array)]
            self.calls.append((slots, mx.compile(self._traced(method, slots))))

    def valid(self) -> bool:
        for parent, key, child in self.children:
            if parent.get(key) is not child:
                return False
        return all(len(m) == size for m, size in self.sizes)

    def __call__(self, call: int, *args):
        slots, compiled = self.calls[call]
        return compiled([m[k] for m, k in slots], *args)

    @staticmethod
    def _traced(method, slots):
        def run(arrays, *args):
            originals = [m[k] for m, k in slots]
            for (m, k), tracer in zip(slots, arrays, strict=True):
                m[k] = tracer
            try:
                return method(*args)
            finally:
                for (m, k), original in zip(slots, originals, strict=True):
                    m[k] = original

        return run


class _Buffers:
    """The cache protocol over a KVCache's whole preallocated buffers, inside the compiled step.

    The new keys go in at `offset` (an array, so one trace serves every step), attention reads the whole
    buffer and the mask hides the columns past `offset`: shapes stay fixed until the cache grows.
    """

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys, self.values, self.offset = keys, values, offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, keys, self.offset, axes=(2,))
        self.values = mx.slice_update(self.values, values, self.offset, axes=(2,))
        return self.keys, self.values

    def make_mask(self, length: int, dtype) -> mx.array:
        visible = mx.arange(self.keys.shape[2]) <= self.offset
        return mx.where(visible, mx.array(0, dtype), mx.array(-mx.inf, dtype))

    def make_positions(self, length: int) -> Positions:
        return Positions(ids=self.offset.reshape(1), end=self.keys.shape[2])


def fits(cache, inputs: mx.array) -> bool:
    """Whether the whole compiled step can run `inputs` [B, 1] over `cache`: plain KVCaches, filled alike."""
    if cache is None or inputs.shape[1] != 1:
        return False
    first = cache[0]
    if type(first) is not KVCache or first.keys is None or first.keys.shape[0] != inputs.shape[0]:
        return False
    return all(type(c) is KVCache and c.offset == first.offset for c in cache)


class DecodeStep:
    """One decoding step of every layer, compiled as one graph over the caches' preallocated buffers.

    One trace per batch size and buffer size: the buffers grow 256 positions at a time, so a trace serves
    up to 256 steps, and attention reads at most 255 masked columns more than the tokens so far.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.compiled = CompiledCalls(model, [(self._step, [model])])

    def valid(self) -> bool:
        return self.compiled.valid()

    def __call__(self, inputs: mx.array, cache: list[KVCache]) -> mx.array:
        """Logits [B, 1, vocab] of `inputs` [B, 1]; the caches take the new keys and values."""
        for layer in self.model.layers:
            views_in_place(layer)
        for c in cache:
            c.reserve(1)
        # The position table is grown and cast out here, so the trace only reads it.
        self.model.model.embed_positions.prepare(cache[0].keys.shape[2], cache[0].keys.dtype)
        if not self.valid():
            self.compiled = CompiledCalls(self.model, [(self._step, [self.model])])
        offset = mx.array(cache[0].offset)
        logits, buffers = self.compiled(0, inputs, offset, [(c.keys, c.values) for c in cache])
        for c, (keys, values) in zip(cache, buffers, strict=True):
            c.keys, c.values = keys, values
            c.offset += 1
        return logits

    def _step(self, inputs: mx.array, offset: mx.array, buffers: list) -> tuple[mx.array, list]:
        model = self.model.model
        caches = [_Buffers(keys, values, offset) for keys, values in buffers]
        # Rows [B, d_model] from end to end: no reshape between layers.
        h = model.embed(inputs.reshape(-1), caches[0].make_positions(1))
        B = h.shape[0]
        mask = caches[0].make_mask(1, h.dtype)
        for layer, cache in zip(model.layers, caches, strict=True):
            h = layer.run(h, B, 1, mask, cache)
        logits = self.model.head(layer_norm(model.layer_norm, h))
        return logits[:, None], [(c.keys, c.values) for c in caches]
