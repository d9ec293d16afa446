"""One q/k/v projection per attention layer, made at load time from the checkpoint's three.

Checkpoints, `convert` output and quantization recipes keep `q_proj`, `k_proj` and `v_proj`. `fuse_qkv`
concatenates each layer's three matrices (and biases, scales) into one buffer and makes the three
modules' arrays views of it, so memory does not grow and the names stay. A layer is fused only where the
three share a format: all float, or all quantized with the same bits, group size and mode (a recipe that
gives `v_proj` more bits leaves its layers separate), and all plain Linear/QuantizedLinear (a projection
wrapped in a LoRA adapter is left alone). Once any of the three is replaced (training, `set_dtype`,
quantizing, an adapter), the layer drops the fused buffer and goes back to its separate projections.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

# Arrays of a projection, in the order QuantizedLinear/Linear keep them; the fused copies are named
# "_qkv_" + name: underscored, so they are neither parameters nor saved, loaded or quantized.
FIELDS = ("weight", "scales", "biases", "bias")


class _Sources:
    """The q/k/v weight arrays a fused buffer stands for: a plain attribute, outside the module tree."""

    def __init__(self, attention: nn.Module):
        self.arrays = self._weights(attention)

    @staticmethod
    def _weights(attention: nn.Module) -> tuple:
        # Item access, not attributes: this runs at every decoding step.
        return (
            attention["q_proj"].get("weight"),
            attention["k_proj"].get("weight"),
            attention["v_proj"].get("weight"),
        )

    def match(self, attention: nn.Module) -> bool:
        a, b, c = self._weights(attention)
        q, k, v = self.arrays
        return a is q and b is k and c is v


def _format(module: nn.Module) -> tuple | None:
    if type(module) is nn.Linear:
        return ("float", tuple(sorted(module)))
    if type(module) is nn.QuantizedLinear:
        return ("quantized", module.group_size, module.bits, module.mode, tuple(sorted(module)))
    return None


def _drop(attention: nn.Module) -> None:
    for name in FIELDS:
        attention.pop(f"_qkv_{name}", None)
    attention._qkv_sources = None


def fuse_qkv(model: nn.Module) -> int:
    """Give every attention layer of `model` whose q/k/v share a format one fused projection; returns
    how many layers were fused. Lazy like the weights (evaluate the parameters to build it now); safe to
    call again, e.g. after quantizing or changing the dtype."""
    fused = 0
    for layer in model.layers:
        attention = layer.self_attn
        _drop(attention)
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        formats = {_format(p) for p in projections}
        if len(formats) != 1 or None in formats:
            continue
        for name in FIELDS:
            if name not in attention.q_proj:
                continue
            whole = mx.concatenate([p[name] for p in projections])
            start = 0
            for p in projections:
                rows = p[name].shape[0]
                p[name] = whole[start : start + rows]
                start += rows
            attention[f"_qkv_{name}"] = whole
        attention._qkv_sources = _Sources(attention)
        fused += 1
    return fused


def fused_in_place(attention: nn.Module) -> bool:
    """True while the layer's fused projection still matches its q/k/v; drops it once one was replaced."""
    sources = getattr(attention, "_qkv_sources", None)
    if sources is None:
        return False
    if sources.match(attention):
        return True
    _drop(attention)
    return False


def project_qkv(attention: nn.Module, x: mx.array) -> mx.array:
    """`x` through the fused projection: queries, keys and values side by side on the last axis."""
    if "_qkv_scales" in attention:
        q = attention.q_proj
        y = mx.quantized_matmul(
            x,
            attention["_qkv_weight"],
            scales=attention["_qkv_scales"],
            biases=attention.get("_qkv_biases"),
            transpose=True,
            group_size=q.group_size,
            bits=q.bits,
            mode=q.mode,
        )
        return y + attention["_qkv_bias"] if "_qkv_bias" in attention else y
    if "_qkv_bias" in attention:
        return mx.addmm(attention["_qkv_bias"], x, attention["_qkv_weight"].T)
    return x @ attention["_qkv_weight"].T


class CompiledHalves:
    """A layer's two cache-free halves compiled over the arrays of the modules each one reads.

    `halves` pairs each method (`layer._before_cache`, `layer._after_cache`) with those modules. The
    arrays go in as explicit arguments, gathered at every call, so new weights are always read; while
    tracing, the tracers stand in for them inside the real modules, so the compiled graph is exactly the
    layer's own math, whatever the modules are (quantized, adapted). A replaced submodule or a changed set
    of arrays makes `valid()` false, and the caller builds anew.
    """

    def __init__(self, layer: nn.Module, halves):
        modules = [m for _, m in layer.named_modules()]
        self.children = [
            (parent, key, child)
            for parent in modules
            for key, child in parent.items()
            if isinstance(child, nn.Module)
        ]
        self.sizes = [(m, len(m)) for m in modules]
        self.calls = []
        for method, owners in halves:
            owned = [m for owner in owners for _, m in owner.named_modules()]
            slots = [(m, k) for m in owned for k, v in m.items() if isinstance(v, mx.array)]
            self.calls.append((slots, mx.compile(self._traced(method, slots))))

    def valid(self) -> bool:
        for parent, key, child in self.children:
            if parent.get(key) is not child:
                return False
        return all(len(m) == size for m, size in self.sizes)

    def __call__(self, half: int, *args):
        slots, compiled = self.calls[half]
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
