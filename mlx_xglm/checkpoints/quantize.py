"""Quantization settings, XGLM-aware mixed recipes, and rebuilding quantized layers from `config.json`.

A checkpoint's `config.json` records `"quantization": {"group_size", "bits", "mode"}` plus, keyed by module
path, the settings of modules that differ from those defaults (mlx-lm's layout). Quantized modules are the
Linear layers and the token embedding, which is also the tied LM head: half of the 564M model's weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import mlx.nn as nn

from ..errors import XGLMError

# mode -> (allowed bits, allowed group sizes, default bits, default group size), as mx.quantize accepts.
MODES = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128), 4, 64),
    "mxfp4": ((4,), (32,), 4, 32),
    "mxfp8": ((8,), (32,), 8, 32),
    "nvfp4": ((4,), (16,), 4, 16),
}

# name -> (bits for most weights, bits for the weights that decide quality)
RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6)}

Predicate = Callable[[str, nn.Module], "bool | dict"]


def quant_settings(
    bits: int | None = None, group_size: int | None = None, mode: str = "affine", bits_param: str = "q_bits"
) -> dict:
    """`{"group_size", "bits", "mode"}` checked against what `mode` supports; None: the mode's default.

    Errors name `q_bits` (or `bits_param`), `q_group_size` or `q_mode`, the parameters of `quantize_model`.
    """
    if mode not in MODES:
        raise XGLMError(f"q_mode {mode!r} is not supported; use one of {', '.join(MODES)}", param="q_mode")
    all_bits, all_groups, default_bits, default_group = MODES[mode]
    bits = default_bits if bits is None else bits
    group_size = default_group if group_size is None else group_size
    if bits not in all_bits:
        raise XGLMError(
            f"{bits_param} {bits} is not supported in {mode} mode; use one of {all_bits}", param=bits_param
        )
    if group_size not in all_groups:
        raise XGLMError(
            f"q_group_size {group_size} is not supported in {mode} mode; use one of {all_groups}",
            param="q_group_size",
        )
    return {"group_size": group_size, "bits": bits, "mode": mode}


def _layer_index(path: str) -> int | None:
    match = re.match(r"model\.layers\.(\d+)\.", path)
    return int(match.group(1)) if match else None


def mixed_recipe(low_bits: int, high_bits: int, num_layers: int, group_size: int = 64) -> Predicate:
    """A predicate giving `high_bits` to the weights that decide output quality, `low_bits` to the rest.

    High: the embedding (which is also the tied LM head), an untied `lm_head`, and `self_attn.v_proj` and
    `fc2` in the first and last eighth of the layers and in every third layer between them. Values and the
    block output carry the most error forward; the embedding decides every logit.
    """
    edge = max(1, num_layers // 8)

    def more_bits(index: int) -> bool:
        return index < edge or index >= num_layers - edge or (index - edge) % 3 == 2

    def predicate(path: str, module: nn.Module) -> dict:
        index = _layer_index(path)
        important = path in ("model.embed_tokens", "lm_head") or (
            index is not None and path.endswith((".self_attn.v_proj", ".fc2")) and more_bits(index)
        )
        bits = high_bits if important else low_bits
        return {"group_size": group_size, "bits": bits, "mode": "affine"}

    return predicate


def resolve_predicate(
    quant_predicate: str | Predicate | None, settings: dict, num_layers: int
) -> tuple[Predicate | None, dict]:
    """A recipe name or a callable `(path, module) -> bool | dict` as a callable (or None), and the
    default settings, which a recipe sets to its low bits."""
    if quant_predicate is None or callable(quant_predicate):
        return quant_predicate, settings
    if quant_predicate not in RECIPES:
        raise XGLMError(
            f"quant_predicate {quant_predicate!r} is unknown; use one of {', '.join(RECIPES)}",
            param="quant_predicate",
        )
    if settings["mode"] != "affine":
        raise XGLMError(
            f"q_mode {settings['mode']} does not go with the mixed recipe {quant_predicate}, which mixes "
            "affine bit widths; use q_mode affine",
            param="q_mode",
        )
    low, high = RECIPES[quant_predicate]
    return mixed_recipe(low, high, num_layers, settings["group_size"]), {**settings, "bits": low}


def quantization_plan(
    model: nn.Module, settings: dict, predicate: Predicate | None = None, embed_bits: int | None = None
) -> dict[str, dict]:
    """Module path -> quantization settings for every module to quantize.

    Modules the predicate declines, and those whose input width is not a multiple of the group size,
    stay in floating point. `embed_bits` overrides the bits of the embedding and an untied head.
    """
    plan = {}
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        chosen = predicate(path, module) if predicate is not None else True
        if chosen is False:
            continue
        chosen = {**settings, **chosen} if isinstance(chosen, dict) else dict(settings)
        if embed_bits is not None and path in ("model.embed_tokens", "lm_head"):
            chosen = quant_settings(embed_bits, chosen["group_size"], chosen["mode"], bits_param="embed_bits")
        if module.weight.shape[-1] % chosen["group_size"] == 0:
            plan[path] = chosen
    return plan


def quantize_model(
    model: nn.Module,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    q_mode: str = "affine",
    quant_predicate: str | Predicate | None = None,
    embed_bits: int | None = None,
) -> dict:
    """Quantize `model`'s Linear layers and token embedding in place; returns config.json's "quantization".

    `q_bits` (2, 3, 4, 5, 6, 8; default 4), `q_group_size` (32, 64, 128; default 64) and `q_mode`
    ("affine", "mxfp4", "mxfp8", "nvfp4"; other modes fix their own bits and group size) are the defaults;
    `quant_predicate` is a recipe name ("mixed_3_6", ...) or a callable `(path, module) -> bool | dict`
    that declines a module or gives its own settings; `embed_bits` sets the bits of the embedding, which
    is also the tied LM head. Layers whose input width is not a multiple of the group size stay in floating
    point. The new weights are computed lazily, as MLX does. Raises XGLMError naming a bad parameter.
    """
    settings = quant_settings(q_bits, q_group_size, q_mode)
    if embed_bits is not None:
        quant_settings(embed_bits, settings["group_size"], settings["mode"], bits_param="embed_bits")
    predicate, settings = resolve_predicate(quant_predicate, settings, model.config.num_layers)
    plan = quantization_plan(model, settings, predicate, embed_bits)
    nn.quantize(model, class_predicate=lambda path, module: plan.get(path, False))
    return config_entry(settings, plan)


def config_entry(settings: dict, plan: dict[str, dict]) -> dict:
    """The `"quantization"` value of config.json: defaults plus the modules that differ from them."""
    overrides = {path: chosen for path, chosen in plan.items() if chosen != settings}
    return {**settings, **overrides}


def module_settings(quantization: dict, path: str) -> dict:
    """The settings a quantized module at `path` was written with, from config.json's entry."""
    chosen = quantization.get(path)
    base = {k: quantization[k] for k in ("group_size", "bits") if k in quantization}
    base["mode"] = quantization.get("mode", "affine")
    return {**base, **chosen} if isinstance(chosen, dict) else base


def apply_quantization(model: nn.Module, quantization: dict, weight_names: set[str]) -> None:
    """Turn the modules a quantized checkpoint stores as quantized into quantized layers, in place."""
    if not isinstance(quantization, dict) or "bits" not in quantization or "group_size" not in quantization:
        raise XGLMError('config.json: "quantization" needs "group_size" and "bits"')

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weight_names:
            return False
        return module_settings(quantization, path)

    nn.quantize(model, class_predicate=predicate)
