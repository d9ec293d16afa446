"""Turning a loaded model into one that trains LoRA adapters: which layers, which modules, what is frozen."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..checkpoints.adapters import TARGETS, LoraConfig, load_adapter_weights, wrap_modules
from ..errors import XGLMError
from ..model.lora import LoRALinear


def check_lora_options(rank: int, alpha: float, dropout: float) -> None:
    """XGLMError naming the first of the adapter's `rank`, `alpha` and `dropout` that cannot train."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise XGLMError(f"rank must be 1 or more (a whole number), got {rank}", param="rank")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise XGLMError(f"alpha must be a finite number, got {alpha}", param="alpha")
    if not 0 <= dropout < 1:
        raise XGLMError(f"dropout must be in [0, 1), got {dropout}", param="dropout")


def lora_config(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: list[str] | tuple[str, ...] = TARGETS,
    num_layers: int = -1,
    base_model: str | None = None,
) -> LoraConfig:
    """A PEFT LoraConfig for `model`, after checking the options.

    `num_layers` adapts the last K decoder layers (-1: all, as mlx-lm counts them); `target_modules` are
    Linear names inside a decoder layer (q_proj, k_proj, v_proj, out_proj, fc1, fc2); the scaling of the
    update is `alpha / rank`. Raises XGLMError naming the parameter at fault.
    """
    total = len(model.layers)
    check_lora_options(rank, alpha, dropout)
    if num_layers == 0 or num_layers < -1:
        raise XGLMError(f"num_layers must be -1 (all) or 1..{total}, got {num_layers}", param="num_layers")
    if num_layers > total:
        raise XGLMError(
            f"num_layers {num_layers} is more than the model's {total} layers; use 1..{total} or -1 for all",
            param="num_layers",
        )
    targets = list(dict.fromkeys(target_modules))
    unknown = [name for name in targets if name not in TARGETS]
    if unknown or not targets:
        raise XGLMError(
            f"target module {unknown[0] if unknown else '(none)'!s} does not exist in XGLM's layers; "
            f"use some of {','.join(TARGETS)}",
            param="target_modules",
        )
    layers = None if num_layers in (-1, total) else list(range(total - num_layers, total))
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        layers_to_transform=layers,
        base_model_name_or_path=base_model,
    )


def adapted_paths(model: nn.Module, config: LoraConfig) -> list[str]:
    """Module paths `config` adapts in `model`: the target Linear layers of the chosen decoder layers."""
    indices = config.layers_to_transform
    indices = range(len(model.layers)) if indices is None else indices
    return [
        f"model.layers.{i}.{'self_attn.' if name.endswith('_proj') else ''}{name}"
        for i in indices
        for name in config.target_modules
    ]


def apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Freeze `model` and wrap the layers `config` targets in trainable LoRALinear, in place.

    Works on float and quantized models alike (QLoRA: the quantized base stays frozen, the adapter trains
    in float32). Returns the adapted module paths.
    """
    paths = adapted_paths(model, config)
    model.freeze()
    scaling = config.lora_alpha / config.r
    wrap_modules(model, dict.fromkeys(paths, (config.r, scaling)), dropout=config.lora_dropout)
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.unfreeze(keys=["lora_A", "lora_B"], recurse=False)
    return paths


def resume_adapter(model: nn.Module, modules: dict, source: str) -> None:
    """Load saved adapter arrays (`read_adapter_weights`) into a model `apply_lora` prepared, to continue
    training; the saved adapter must cover the same modules with the same rank."""
    adapted = sorted(path for path, m in model.named_modules() if isinstance(m, LoRALinear))
    if sorted(modules) != adapted:
        different = sorted(set(modules) ^ set(adapted))[0]
        where = "only in the saved adapter" if different in modules else "adapted here but not saved"
        raise XGLMError(
            f"{source} adapts other modules than this run ({different} is {where}); use the "
            "target_modules and num_layers it was trained with",
            param="resume_adapter_file",
        )
    load_adapter_weights(model, modules, source)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a quantized weight counts as the values it stands for.

    Only parameters count: a module's underscored arrays (the fast path's fused q/k/v buffer and
    transposed weight views) are other names for the same values, not more of them."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = 0
    for _, module in model.named_modules():
        own = {k: v for k, v in module.items() if isinstance(v, mx.array) and not k.startswith("_")}
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            own.pop("scales")
            own.pop("biases", None)
            total += own.pop("weight").size * 32 // module.bits
        total += sum(v.size for v in own.values())
    return trainable, total
