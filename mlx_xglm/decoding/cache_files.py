"""Checking prompt-cache files before they become caches, and the fingerprint of the model that made them.

A cache file is a safetensors file whose header lists the layers (`mlx_xglm.cache`) and whose arrays are
`{i}.keys` and `{i}.values`. Everything in it is checked against everything else (types, offsets, shapes,
the file's size) before a cache is built, and its fingerprint against the model that is about to use it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..errors import XGLMError

FINGERPRINT_KEY = "mlx_xglm.fingerprint"
# Positions past this would need a sinusoid table of gigabytes: no real session reaches it.
MAX_OFFSET = 2**20
SAMPLES_PER_TENSOR = 16
# A quantized cache's keys and values are each these three arrays, as mx.quantize returns them.
QUANTIZED_PARTS = ("packed", "scales", "biases")


def model_fingerprint(model, tokenizer=None) -> str:
    """A short hash of `model` (and `tokenizer`): what a prompt-cache file records about its maker.

    It covers the config, every parameter's name, shape and dtype, 16 values sampled evenly from each,
    and the tokenizer's sentencepiece model, so it is cheap to compute and tells models of the same shape
    apart. Pass it to `save_prompt_cache` and `load_prompt_cache` to refuse a cache made by another model.
    """
    digest = hashlib.sha256(json.dumps(asdict(model.config), sort_keys=True, default=str).encode())
    params = tree_flatten(model.parameters())
    samples = []
    for _, value in params:
        flat = value.reshape(-1)
        index = np.linspace(0, max(flat.size - 1, 0), min(SAMPLES_PER_TENSOR, flat.size)).astype(np.int32)
        sample = flat[mx.array(index)]
        samples.append(sample.astype(mx.float32) if mx.issubdtype(sample.dtype, mx.floating) else sample)
    mx.eval(samples)
    for (name, value), sample in zip(params, samples, strict=True):
        digest.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
        digest.update(np.array(sample).tobytes())
    if tokenizer is not None:
        digest.update(tokenizer.sp_model.serialized_model_proto())
    return digest.hexdigest()[:32]


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_quantized(i: int, layer: dict, arrays: dict, kept: int, bad) -> tuple[list[str], tuple | None]:
    """The array names of quantized layer `i` and its (batch, heads), after checking shapes and dtypes."""
    group_size, bits = layer.get("group_size"), layer.get("bits")
    if group_size not in (32, 64, 128) or bits not in (2, 3, 4, 5, 6, 8):
        raise bad(f"layer {i} has group_size {group_size!r} and bits {bits!r}")
    names = [f"{i}.{name}.{p}" for name in ("keys", "values") for p in QUANTIZED_PARTS]
    found = [arrays.get(n) for n in names]
    if all(a is None for a in found) and not kept:
        return [], None
    if any(a is None for a in found):
        raise bad(f"layer {i} holds {kept} positions but some of its quantized keys or values are missing")
    for packed, scales, biases in (found[:3], found[3:]):
        if (
            packed.dtype != mx.uint32
            or not all(mx.issubdtype(a.dtype, mx.floating) for a in (scales, biases))
            or any(a.ndim != 4 or a.shape[:3] != found[0].shape[:3] for a in (packed, scales, biases))
            or scales.shape != biases.shape
            or packed.shape[3] * 32 != scales.shape[3] * group_size * bits
        ):
            raise bad(f"layer {i} has quantized arrays of shapes {[tuple(a.shape) for a in found]}")
    if found[0].shape[2] != kept:
        raise bad(f"layer {i} stores {found[0].shape[2]} positions but its offset implies {kept}")
    return names, found[0].shape[:2]


def check_cache_file(
    path: Path,
    arrays: dict[str, mx.array],
    header: dict[str, str],
    cache_types: Collection[str],
    fingerprint: str | None = None,
) -> tuple[list[dict], dict]:
    """The layer records and metadata of a prompt-cache file, after checking they describe a real cache.

    Raises XGLMError naming `path` for a layer type not in `cache_types`, missing or extra arrays, arrays
    of the wrong rank or length, inconsistent layers, an offset past `MAX_OFFSET`, arrays larger than the
    file, or a fingerprint that differs from `fingerprint` (the file was made by another model or tokenizer).
    """

    def bad(what: str) -> XGLMError:
        return XGLMError(
            f"{path} is not a usable prompt cache: {what}; delete it and make it again", param="prompt_cache"
        )

    try:
        layers = json.loads(header["mlx_xglm.cache"])
        metadata = json.loads(header.get("mlx_xglm.metadata", "{}"))
    except KeyError:
        raise bad("it has no mlx_xglm.cache header (not written by save_prompt_cache)") from None
    except ValueError as e:
        raise bad(f"its header is not valid JSON ({e})") from None
    if not isinstance(layers, list) or not layers:
        raise bad("its mlx_xglm.cache header is not a list of layers")
    if not isinstance(metadata, dict):
        raise bad("its mlx_xglm.metadata header is not a JSON object")
    expected, shapes = set(), set()
    for i, layer in enumerate(layers):
        kind = layer.get("type") if isinstance(layer, dict) else None
        if kind not in cache_types:
            raise bad(f"layer {i} has unknown type {kind!r} (expected one of {', '.join(cache_types)})")
        offset = layer.get("offset")
        if not _is_count(offset) or offset > MAX_OFFSET:
            raise bad(f"layer {i} has offset {offset!r} (expected 0 to {MAX_OFFSET})")
        kept = offset
        if kind == "RotatingKVCache":
            max_size = layer.get("max_size")
            if not _is_count(max_size) or not 1 <= max_size <= MAX_OFFSET:
                raise bad(f"layer {i} has max_size {max_size!r}")
            kept = min(offset, max_size)
        if kind == "QuantizedKVCache":
            names, batch_heads = _check_quantized(i, layer, arrays, kept, bad)
            expected.update(names)
            shapes.add((kind, offset, None, batch_heads))
            continue
        keys, values = arrays.get(f"{i}.keys"), arrays.get(f"{i}.values")
        if (keys is None) != (values is None) or (keys is None and kept):
            raise bad(f"layer {i} holds {kept} positions but its keys or values are missing")
        if keys is not None:
            if keys.ndim != 4 or values.ndim != 4 or keys.shape[:3] != values.shape[:3]:
                raise bad(f"layer {i} has keys {tuple(keys.shape)} and values {tuple(values.shape)}")
            if keys.shape[2] != kept:
                raise bad(f"layer {i} stores {keys.shape[2]} positions but its offset implies {kept}")
            if not all(mx.issubdtype(a.dtype, mx.floating) for a in (keys, values)):
                raise bad(f"layer {i} holds {keys.dtype} keys; keys and values are floating point")
            expected.update((f"{i}.keys", f"{i}.values"))
        shapes.add((kind, offset, layer.get("max_size"), None if keys is None else keys.shape[:2]))
    if len({s[:3] for s in shapes}) > 1 or len({s[3] for s in shapes if s[3] is not None}) > 1:
        raise bad("its layers disagree on type, offset, batch or heads")
    extra = sorted(set(arrays) - expected)
    if extra:
        raise bad(f"it holds an unexpected array {extra[0]}")
    if sum(a.nbytes for a in arrays.values()) > path.stat().st_size:
        raise bad("its arrays are larger than the file (truncated?)")
    recorded = header.get(FINGERPRINT_KEY)
    if fingerprint is not None and recorded is not None and recorded != fingerprint:
        raise XGLMError(
            f"{path} was made by another model or tokenizer (fingerprint {recorded}, this model's is "
            f"{fingerprint}); a prompt cache only works with the model that made it",
            param="prompt_cache",
        )
    return layers, metadata
