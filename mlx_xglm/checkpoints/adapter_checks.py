"""What an adapter must hold to be applied: peft's checks of a LoraConfig, and weights that agree with it.

An adapter with a NaN `lora_alpha`, a rank of 0, or NaN weights would load and silently ruin every output;
these checks refuse it with a message naming the field or tensor.
"""

from __future__ import annotations

import math
import re

import mlx.core as mx

from ..errors import XGLMError


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def config_problem(config) -> str | None:
    """What makes a `LoraConfig` unusable (as peft's LoraConfig checks), or None."""
    if not (_is_int(config.r) and config.r > 0):
        return f"r must be a whole number above 0, got {config.r!r}"
    if not _is_number(config.lora_alpha):
        return f"lora_alpha must be a finite number, got {config.lora_alpha!r}"
    if not (_is_number(config.lora_dropout) and 0 <= config.lora_dropout < 1):
        return f"lora_dropout must be a number in [0, 1), got {config.lora_dropout!r}"
    if not isinstance(config.use_rslora, bool):
        return f"use_rslora must be true or false, got {config.use_rslora!r}"
    for name, valid, want in (
        ("rank_pattern", lambda v: _is_int(v) and v > 0, "a whole number above 0"),
        ("alpha_pattern", _is_number, "a finite number"),
    ):
        pattern = getattr(config, name)
        if not isinstance(pattern, dict):
            return f"{name} must map module names to values, got {pattern!r}"
        for key, value in pattern.items():
            if not isinstance(key, str) or not valid(value):
                return f"{name}[{key!r}] must be {want}, got {value!r}"
            try:
                re.compile(key)
            except re.error:
                return f"{name} key {key!r} is not a valid module pattern"
    return None


def check_weights(modules: dict, source: str, config=None) -> None:
    """Each module's lora_A [r, in] and lora_B [out, r] (`read_adapter_weights`) agree on r (with a
    `LoraConfig`, its rank for the module) and are finite."""
    for path, parts in sorted(modules.items()):
        a, b = parts["lora_A"], parts["lora_B"]
        name = f"{source}: {path}"
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise XGLMError(
                f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not share one rank",
                param="adapter_path",
            )
        if config is not None and a.shape[0] != config.rank(path):
            raise XGLMError(
                f"{name} has rank {a.shape[0]}, but its adapter_config.json says "
                f"{config.rank(path)} (r or rank_pattern); the config and the weights disagree",
                param="adapter_path",
            )
        for part in ("lora_A", "lora_B"):
            if not mx.isfinite(parts[part]).all().item():
                raise XGLMError(f"{name}.{part}.weight holds NaN or infinite values", param="adapter_path")
