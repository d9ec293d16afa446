"""LoRA: a frozen Linear (float or quantized) plus a trainable low-rank update, as PEFT computes it.

`y = base_layer(x) + scaling * lora_B(lora_A(dropout(x)))` with `scaling = lora_alpha / r`. The names and
shapes are PEFT's (`lora_A` [r, in], `lora_B` [out, r], the wrapped layer is `base_layer`), so adapter
tensors map one to one onto PEFT's files and merge exactly as PEFT merges them.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .dropout import Dropout


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(input, output) widths of an nn.Linear or nn.QuantizedLinear."""
    out_dims, packed = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        return packed * 32 // layer.bits, out_dims
    return packed, out_dims


def dequantized_weight(layer: nn.Module) -> mx.array:
    """The floating-point weight of a QuantizedLinear or QuantizedEmbedding, with the layer's own settings."""
    return mx.dequantize(
        layer.weight,
        layer.scales,
        layer.get("biases"),
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )


class LoRALinear(nn.Module):
    """`base_layer` (frozen) plus `scaling * lora_B @ lora_A`; the adapter trains in float32.

    `lora_A` starts as PEFT's (kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))) and
    `lora_B` at zero, so a fresh adapter leaves the model's outputs unchanged.
    """

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        in_dims, out_dims = linear_dims(base_layer)
        self.base_layer = base_layer
        self.base_layer.freeze()
        self.r = r
        self.scaling = scaling
        self.dropout = Dropout(dropout) if dropout > 0 else None
        bound = 1 / math.sqrt(in_dims)
        self.lora_A = mx.random.uniform(-bound, bound, (r, in_dims))
        self.lora_B = mx.zeros((out_dims, r))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base_layer(x)
        h = self.dropout(x) if self.dropout is not None else x
        z = (h @ self.lora_A.T) @ self.lora_B.T
        return y + (self.scaling * z).astype(y.dtype)

    def delta_weight(self) -> mx.array:
        """The update this adapter adds to the base weight: scaling * lora_B @ lora_A, [out, in]."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def fused(self, dequantize: bool = False) -> nn.Module:
        """The base layer with the update merged into its weight.

        A quantized base is dequantized, merged and quantized again with its own settings (so the adapter
        is kept, up to the quantization error), or left in floating point with `dequantize`.
        """
        base = self.base_layer
        quantized = isinstance(base, nn.QuantizedLinear)
        weight = dequantized_weight(base) if quantized else base.weight
        in_dims, out_dims = linear_dims(base)
        has_bias = "bias" in base
        merged = nn.Linear(in_dims, out_dims, bias=has_bias)
        merged.weight = (weight.astype(mx.float32) + self.delta_weight()).astype(weight.dtype)
        if has_bias:
            merged.bias = base.bias
        if quantized and not dequantize:
            return nn.QuantizedLinear.from_linear(merged, base.group_size, base.bits, mode=base.mode)
        return merged
