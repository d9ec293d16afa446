"""Prompt caches: one model cache per layer, made, trimmed, checked, saved to and loaded from files."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from ..errors import XGLMError
from ..model.cache import CACHE_TYPES, KVCache, QuantizedKVCache, RotatingKVCache
from ..outputs import save_safetensors, staged_file
from .cache_files import FINGERPRINT_KEY, QUANTIZED_PARTS, check_cache_file


def make_prompt_cache(model, max_kv_size: int | None = None) -> list:
    """One cache per layer of `model`; with `max_kv_size`, rotating caches that keep that many tokens."""
    if max_kv_size is None:
        return model.make_cache()
    return [RotatingKVCache(max_kv_size) for _ in model.layers]


def check_kv_bits(
    kv_bits: int | None, kv_group_size: int, quantized_kv_start: int, max_kv_size=None, head_dim=None
) -> None:
    """Raise XGLMError unless the quantized-cache settings are usable (with a model's `head_dim`, that
    `kv_group_size` divides it); a rotating cache is not quantized."""
    if kv_bits is None:
        return
    QuantizedKVCache(kv_group_size, kv_bits)
    if head_dim is not None and head_dim % kv_group_size:
        raise XGLMError(
            f"kv_group_size {kv_group_size} does not divide the model's head_dim {head_dim}; pick one of "
            f"{QuantizedKVCache.GROUP_SIZES} that does",
            param="kv_group_size",
        )
    if not (isinstance(quantized_kv_start, int) and quantized_kv_start >= 0):
        raise XGLMError(
            f"quantized_kv_start must be 0 or more tokens, got {quantized_kv_start}",
            param="quantized_kv_start",
        )
    if max_kv_size is not None:
        raise XGLMError(
            "a rotating cache (max_kv_size) cannot be quantized; drop max_kv_size or kv_bits", param="kv_bits"
        )


def maybe_quantize_kv_cache(
    prompt_cache: list, quantized_kv_start: int, kv_group_size: int, kv_bits: int | None
) -> None:
    """Replace, in place, the float caches of `prompt_cache` (single-row or batch) by quantized ones once
    they hold more than `quantized_kv_start` positions (mlx-lm's rule; nothing happens without `kv_bits`)."""
    if kv_bits is None:
        return
    for i, layer in enumerate(prompt_cache):
        float_cache = isinstance(layer, KVCache) and not isinstance(layer, QuantizedKVCache)
        if float_cache and layer.offset > quantized_kv_start:
            prompt_cache[i] = layer.to_quantized(group_size=kv_group_size, bits=kv_bits)


def cached_tokens(prompt_cache: list) -> int:
    """How many positions `prompt_cache` has read (a rotating cache keeps counting past its window)."""
    return prompt_cache[0].offset


def prompt_cache_max_kv_size(prompt_cache: list) -> int | None:
    """The `max_kv_size` the cache was made with; None when it keeps every position."""
    return getattr(prompt_cache[0], "max_size", None)


def can_trim_prompt_cache(prompt_cache: list) -> bool:
    """Whether the last positions can be dropped: always, unless a rotating cache has overwritten some."""
    return all(layer.is_trimmable() for layer in prompt_cache)


def trim_prompt_cache(prompt_cache: list, num_tokens: int) -> int:
    """Drop the last `num_tokens` positions of every layer, in place; returns how many were dropped
    (0 when the cache cannot be trimmed, at most the positions it holds)."""
    if not can_trim_prompt_cache(prompt_cache):
        return 0
    trimmed = [layer.trim(num_tokens) for layer in prompt_cache]
    return trimmed[0]


def save_prompt_cache(
    path: str | Path, cache: list, metadata: dict[str, str] | None = None, fingerprint: str | None = None
) -> None:
    """Write `cache` (and optional string `metadata`) to one safetensors file, atomically.

    `fingerprint` (`model_fingerprint(model, tokenizer)`) records the model that made the cache, so that
    `load_prompt_cache` can refuse it for another model.
    """
    path = Path(path)
    arrays = {}
    layers = []
    for i, layer in enumerate(cache):
        name = type(layer).__name__
        if name not in CACHE_TYPES:
            raise XGLMError(f"cannot save a prompt cache holding {name} (layer {i}); use make_prompt_cache")
        for which, part in zip(("keys", "values"), layer.state, strict=False):
            if isinstance(part, tuple):  # a quantized cache: packed ints, scales, biases
                arrays.update({f"{i}.{which}.{p}": a for p, a in zip(QUANTIZED_PARTS, part, strict=True)})
            else:
                arrays[f"{i}.{which}"] = part
        layers.append({"type": name, **layer.meta_state})
    header = {"mlx_xglm.cache": json.dumps(layers), "mlx_xglm.metadata": json.dumps(dict(metadata or {}))}
    if fingerprint is not None:
        header[FINGERPRINT_KEY] = fingerprint
    mx.eval(arrays)
    with staged_file(path, param="path") as work:
        save_safetensors(work, arrays, metadata=header)


def load_prompt_cache(path: str | Path, return_metadata: bool = False, fingerprint: str | None = None):
    """Read a cache written by `save_prompt_cache`; with `return_metadata`, also its metadata dict.

    The file is checked before anything is built from it (`check_cache_file`); with `fingerprint`, a
    cache recorded by another model or tokenizer is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise XGLMError(f"prompt cache file {path} not found")
    try:
        arrays, header = mx.load(str(path), return_metadata=True)
    except (ValueError, RuntimeError, OSError) as e:
        raise XGLMError(f"{path} is not a prompt cache written by save_prompt_cache ({e})") from None
    layers, metadata = check_cache_file(path, arrays, header, CACHE_TYPES, fingerprint)
    cache = []
    for i, layer in enumerate(layers):
        kind = layer.pop("type")
        if kind == "QuantizedKVCache":
            parts = [
                tuple(arrays.get(f"{i}.{name}.{p}") for p in QUANTIZED_PARTS) for name in ("keys", "values")
            ]
            state = tuple(parts) if parts[0][0] is not None else ()
        else:
            state = (arrays[f"{i}.keys"], arrays[f"{i}.values"]) if f"{i}.keys" in arrays else ()
        cache.append(CACHE_TYPES[kind].from_state(state, layer))
    return (cache, metadata) if return_metadata else cache


def check_prompt_cache(model, cache: list) -> None:
    """Raise XGLMError unless `cache` has the layer count and key shape of `model`."""
    config = model.config
    # A layer's own head count: under tensor parallelism each rank holds its share of the heads (a
    # pipeline stage's placeholder layers have none).
    attention = getattr(model.layers[0], "self_attn", None)
    want = (config.attention_heads if attention is None else attention.num_heads, config.head_dim)
    if len(cache) != len(model.layers):
        raise XGLMError(
            f"the prompt cache has {len(cache)} layers but the model has {len(model.layers)}; "
            "a prompt cache only works with the model that made it"
        )
    for i, layer in enumerate(cache):
        state = layer.state
        if not state:
            continue
        keys = state[0]
        if isinstance(keys, tuple):  # packed ints, scales: one scale per group of values
            heads, dims = keys[0].shape[1], keys[1].shape[3] * layer.group_size
        else:
            heads, dims = keys.shape[1], keys.shape[3]
        if (heads, dims) != want:
            raise XGLMError(
                f"prompt cache layer {i} holds {heads} heads of {dims} dims but the model has {want[0]} "
                f"heads of {want[1]}; a prompt cache only works with the model that made it"
            )
