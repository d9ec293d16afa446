"""Per-layer key/value caches, preallocated in steps and written in place, and prompt-cache files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import mlx.core as mx

from ..errors import XGLMError
from ..model.masks import Positions, causal, left_padding_mask


class _LayerCache:
    """What both caches share: trimming from the end, positions of new tokens, their size in bytes.

    The cache protocol (these caches and the batch cache): `offset`, `update_and_fetch(keys, values)`,
    `make_mask(length, dtype)` and `make_positions(length)` for the next `length` tokens, `state`.
    """

    keys: mx.array | None
    values: mx.array | None
    offset: int

    def trim(self, n: int) -> int:
        """Drop the last `n` positions (at most all of them, none when not trimmable); returns how many."""
        if not self.is_trimmable():
            return 0
        n = min(self.offset, n)
        self.offset -= n
        return n

    def make_positions(self, length: int) -> Positions:
        """Positions of `length` new tokens: they go on from `offset`."""
        return Positions.range(self.offset, length)

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


class KVCache(_LayerCache):
    """Keys and values of one attention layer, [B, heads, S, head_dim], grown `step` positions at a time.

    Follows mlx-lm's cache protocol: `offset`, `update_and_fetch(keys, values)`, `state`, `trim`.
    """

    step = 256

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev = self.offset
        needed = prev + keys.shape[2]
        if self.keys is None or needed > self.keys.shape[2]:
            B, H, _, D = keys.shape
            grow = ((keys.shape[2] + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, grow, D), keys.dtype)
            new_v = mx.zeros((B, H, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.offset = needed
        self.keys[..., prev:needed, :] = keys
        self.values[..., prev:needed, :] = values
        return self.keys[..., :needed, :], self.values[..., :needed, :]

    def make_mask(self, length: int, dtype=mx.float32):
        """The attention mask for `length` new queries: causal, aligned to the end of the keys."""
        return causal(length)

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, value: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = value
        self.offset = self.keys.shape[2]

    @property
    def meta_state(self) -> dict[str, int]:
        return {"offset": self.offset}

    @meta_state.setter
    def meta_state(self, value: dict[str, int]) -> None:
        self.offset = int(value["offset"])

    def is_trimmable(self) -> bool:
        return True


class RotatingKVCache(_LayerCache):
    """A window of the last `max_size` positions of one layer, in a ring buffer of at most `max_size` slots.

    `offset` keeps counting every token seen: XGLM adds absolute sinusoid positions to the embeddings, so
    the model reads positions from it while old keys are overwritten. Positions live inside the keys, so
    attention does not care in which slot a key sits; each query sees the `max_size` most recent positions,
    itself included.
    """

    step = 256

    def __init__(self, max_size: int):
        if max_size < 1:
            raise ValueError(f"max_kv_size must be a positive number of tokens, got {max_size}")
        self.max_size = max_size
        self.keys = None
        self.values = None
        self.offset = 0
        self._start = 0  # slot of the oldest kept position once the ring is full

    @property
    def _kept(self) -> int:
        return min(self.offset, self.max_size)

    def _in_order(self, array: mx.array) -> mx.array:
        kept = array[..., : self._kept, :]
        if self._start == 0:
            return kept
        return mx.concatenate([kept[..., self._start :, :], kept[..., : self._start, :]], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if keys.shape[2] == 1 and self.keys is not None:
            return self._update_one(keys, values)
        # Several new positions: attend over the kept window plus the new ones (make_mask hides what
        # falls out of each query's window), then keep the last max_size in order.
        if self.keys is not None:
            keys = mx.concatenate([self._in_order(self.keys), keys], axis=2)
            values = mx.concatenate([self._in_order(self.values), values], axis=2)
        self.offset += keys.shape[2] - self._kept
        self.keys = keys[..., -self.max_size :, :]
        self.values = values[..., -self.max_size :, :]
        self._start = 0
        return keys, values

    def _update_one(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        kept = self._kept
        if kept < self.max_size:
            if kept == self.keys.shape[2]:
                B, H, _, D = self.keys.shape
                grow = min(self.step, self.max_size - kept)
                self.keys = mx.concatenate([self.keys, mx.zeros((B, H, grow, D), keys.dtype)], axis=2)
                self.values = mx.concatenate(
                    [self.values, mx.zeros((B, H, grow, values.shape[3]), values.dtype)], axis=2
                )
            slot = kept
        else:
            slot = self._start
            self._start = (self._start + 1) % self.max_size
        self.keys[..., slot : slot + 1, :] = keys
        self.values[..., slot : slot + 1, :] = values
        self.offset += 1
        return self.keys[..., : self._kept, :], self.values[..., : self._kept, :]

    def make_mask(self, length: int, dtype=mx.float32):
        """The mask for `length` new queries over the kept window followed by the new keys."""
        kept = self._kept
        if length == 1 or kept + length <= self.max_size:
            return causal(length)
        return left_padding_mask(mx.zeros((1,), mx.int32), kept, length, self.max_size, dtype)

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        if self.keys is None:
            return ()
        return self._in_order(self.keys), self._in_order(self.values)

    @state.setter
    def state(self, value: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = value
        self._start = 0

    @property
    def meta_state(self) -> dict[str, int]:
        return {"offset": self.offset, "max_size": self.max_size}

    @meta_state.setter
    def meta_state(self, value: dict[str, int]) -> None:
        self.offset = int(value["offset"])
        self.max_size = int(value["max_size"])

    def is_trimmable(self) -> bool:
        return self.offset <= self.max_size


CACHE_TYPES = {"KVCache": KVCache, "RotatingKVCache": RotatingKVCache}


def make_prompt_cache(model, max_kv_size: int | None = None) -> list:
    """One cache per layer of `model`; with `max_kv_size`, rotating caches that keep that many tokens."""
    if max_kv_size is None:
        return model.make_cache()
    return [RotatingKVCache(max_kv_size) for _ in model.layers]


def save_prompt_cache(path: str | Path, cache: list, metadata: dict[str, str] | None = None) -> None:
    """Write `cache` (and optional string `metadata`) to one safetensors file, atomically."""
    path = Path(path)
    arrays = {}
    layers = []
    for i, layer in enumerate(cache):
        name = type(layer).__name__
        if name not in CACHE_TYPES:
            raise XGLMError(f"cannot save a prompt cache holding {name} (layer {i}); use make_prompt_cache")
        state = layer.state
        if state:
            arrays[f"{i}.keys"], arrays[f"{i}.values"] = state
        layers.append({"type": name, **layer.meta_state})
    header = {"mlx_xglm.cache": json.dumps(layers), "mlx_xglm.metadata": json.dumps(dict(metadata or {}))}
    mx.eval(arrays)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        mx.save_safetensors(tmp, arrays, metadata=header)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_prompt_cache(path: str | Path, return_metadata: bool = False):
    """Read a cache written by `save_prompt_cache`; with `return_metadata`, also its metadata dict."""
    path = Path(path)
    if not path.is_file():
        raise XGLMError(f"prompt cache file {path} not found")
    try:
        arrays, header = mx.load(str(path), return_metadata=True)
        layers = json.loads(header["mlx_xglm.cache"])
        metadata = json.loads(header.get("mlx_xglm.metadata", "{}"))
    except (KeyError, ValueError, RuntimeError) as e:
        raise XGLMError(f"{path} is not a prompt cache written by save_prompt_cache ({e})") from None
    cache = []
    for i, layer in enumerate(layers):
        kind = layer.pop("type")
        item = RotatingKVCache(layer["max_size"]) if kind == "RotatingKVCache" else CACHE_TYPES[kind]()
        if f"{i}.keys" in arrays:
            item.state = arrays[f"{i}.keys"], arrays[f"{i}.values"]
        item.meta_state = layer
        cache.append(item)
    return (cache, metadata) if return_metadata else cache


def check_prompt_cache(model, cache: list) -> None:
    """Raise XGLMError unless `cache` has the layer count and key shape of `model`."""
    config = model.config
    want = (config.attention_heads, config.head_dim)
    if len(cache) != len(model.layers):
        raise XGLMError(
            f"the prompt cache has {len(cache)} layers but the model has {len(model.layers)}; "
            "a prompt cache only works with the model that made it"
        )
    for i, layer in enumerate(cache):
        state = layer.state
        if state and (state[0].shape[1], state[0].shape[3]) != want:
            heads, dims = state[0].shape[1], state[0].shape[3]
            raise XGLMError(
                f"prompt cache layer {i} holds {heads} heads of {dims} dims but the model has {want[0]} "
                f"heads of {want[1]}; a prompt cache only works with the model that made it"
            )
