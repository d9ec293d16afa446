"""One q/k/v projection per attention layer, made at load time from the checkpoint's three, and the
transposed weight views the decoding path multiplies by.

Checkpoints, `convert` output and quantization recipes keep `q_proj`, `k_proj` and `v_proj`. `fuse_qkv`
concatenates each layer's three matrices (and biases, scales) into one buffer and makes the three
modules' arrays views of it, so memory does not grow and the names stay. A layer is fused only where the
three share a format: all float, or all quantized with the same bits, group size and mode (a recipe that
gives `v_proj` more bits leaves its layers separate), and all plain Linear/QuantizedLinear (a projection
wrapped in a LoRA adapter is left alone). Once any of the three is replaced (training, `set_dtype`,
quantizing, an adapter), the layer drops the fused buffer and goes back to its separate projections.

Every float projection of a layer (the fused q/k/v, out_proj, fc1, fc2) also keeps its weight transposed
and its bias as a row, views of the same memory made once: `x @ weight.T` would otherwise add a transpose
and a broadcast to the graph at every step, and a small model's decoding time is the count of such nodes.
They are used at inference only (training reads the parameters themselves, so gradients reach them) and
dropped like the fused buffer once the weight or bias they view is replaced.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

# Arrays of a projection, in the order QuantizedLinear/Linear keep them; the fused copies are named
# "_qkv_" + name: underscored, so they are neither parameters nor saved, loaded or quantized.
FIELDS = ("weight", "scales", "biases", "bias")
# The views of a float projection's weight and bias, after its prefix ("_" or "_qkv_").
VIEWS = ("weight_t", "bias_row")
ON_GPU = mx.default_device() == mx.gpu


class _Sources:
    """The arrays a fused buffer or a view stands for: a plain attribute, outside the module tree."""

    def __init__(self, arrays: tuple):
        self.arrays = arrays

    def match(self, arrays: tuple) -> bool:
        return all(a is b for a, b in zip(arrays, self.arrays, strict=True))


def _qkv_weights(attention: nn.Module) -> tuple:
    # Item access, not attributes: this runs at every decoding step.
    return (
        attention["q_proj"].get("weight"),
        attention["k_proj"].get("weight"),
        attention["v_proj"].get("weight"),
    )


def _linear_arrays(linear: nn.Module) -> tuple:
    return linear.get("weight"), linear.get("bias")


def _format(module: nn.Module) -> tuple | None:
    if type(module) is nn.Linear:
        return ("float", tuple(sorted(module)))
    if type(module) is nn.QuantizedLinear:
        return ("quantized", module.group_size, module.bits, module.mode, tuple(sorted(module)))
    return None


def _add_views(module: nn.Module, prefix: str, weight: mx.array, bias: mx.array | None) -> None:
    module[prefix + "weight_t"] = weight.T
    if bias is not None:
        module[prefix + "bias_row"] = bias.reshape(1, -1)


def _drop(module: nn.Module, prefix: str, fields=()) -> None:
    for name in (*fields, *VIEWS):
        module.pop(prefix + name, None)
    setattr(module, prefix + "sources", None)


def fuse_qkv(model: nn.Module) -> int:
    """Give every attention layer of `model` whose q/k/v share a format one fused projection, and every
    float projection its transposed views; returns how many layers were fused. Lazy like the weights
    (evaluate the parameters to build them now); safe to call again, e.g. after quantizing or changing
    the dtype."""
    fused = 0
    for layer in model.layers:
        attention = layer.self_attn
        for linear in (attention.out_proj, layer.fc1, layer.fc2):
            _drop(linear, "_")
            if type(linear) is nn.Linear:
                _add_views(linear, "_", linear["weight"], linear.get("bias"))
                linear._sources = _Sources(_linear_arrays(linear))
        _drop(attention, "_qkv_", FIELDS)
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
        if "_qkv_scales" not in attention:
            _add_views(attention, "_qkv_", attention["_qkv_weight"], attention.get("_qkv_bias"))
        attention._qkv_sources = _Sources(_qkv_weights(attention))
        fused += 1
    return fused


def _linear_in_place(linear: nn.Module) -> None:
    sources = getattr(linear, "_sources", None)
    if sources is not None and not sources.match(_linear_arrays(linear)):
        _drop(linear, "_")


def fused_in_place(attention: nn.Module) -> None:
    """Drop the attention's fused projection and views whose weights were replaced since they were made."""
    sources = getattr(attention, "_qkv_sources", None)
    if sources is not None and not sources.match(_qkv_weights(attention)):
        _drop(attention, "_qkv_", FIELDS)
    _linear_in_place(attention["out_proj"])


def views_in_place(layer: nn.Module) -> None:
    """`fused_in_place` for the layer's attention, and the same check for its MLP's views."""
    fused_in_place(layer["self_attn"])
    _linear_in_place(layer["fc1"])
    _linear_in_place(layer["fc2"])


def linear(module: nn.Module, x: mx.array) -> mx.array:
    """`module(x)`, through the module's transposed views at inference when it has them."""
    weight_t = module.get("_weight_t")
    if weight_t is None or module.training:
        return module(x)
    bias = module.get("_bias_row")
    return x @ weight_t if bias is None else mx.addmm(bias, x, weight_t)


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
    if "_qkv_bias_row" in attention:
        return mx.addmm(attention["_qkv_bias_row"], x, attention["_qkv_weight_t"])
    return x @ attention["_qkv_weight_t"]


def layer_norm(module: nn.LayerNorm, x: mx.array) -> mx.array:
    """`module(x)`, spelled out on the CPU at inference, with the same values.

    MLX has no LayerNorm kernel for the CPU: there `mx.fast.layer_norm` is composed of ops, and compiled
    it makes five nodes. Written here with the mean's subtraction spelled twice (once as a product, once
    as a quotient: equal for a power-of-two width, as XGLM's are; others run the module), the compiler
    fuses each into its own kernel: four nodes, one fewer per LayerNorm and step. Not compiled, it makes
    more nodes than the module: for compiled code only.
    """
    n = x.shape[-1]
    if ON_GPU or module.training or n & (n - 1):
        return module(x)
    y = x.astype(mx.float32)
    total = y.sum(axis=-1, keepdims=True)
    variance = mx.square(y - total * (1 / n)).sum(axis=-1, keepdims=True) * (1 / n)
    y = ((y - total / n) * mx.rsqrt(variance + module.eps)).astype(x.dtype)
    if "weight" in module:
        y = y * module["weight"]
    return y + module["bias"] if "bias" in module else y
