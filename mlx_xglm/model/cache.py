"""Per-layer key/value caches: the model's contract with every decoding loop (as in mlx-lm's models/).

One protocol, written once in `LayerCache`: `offset` (positions read so far), `update_and_fetch(keys,
values)` (store the new keys and values [B, heads, L, head_dim], return every key and value to attend
over), `make_mask(length, dtype)` and `make_positions(length)` for the next `length` tokens, `state` and
`meta_state` (what a prompt-cache file keeps), `trim`, `is_trimmable` and `nbytes`. The caches here and the
batch cache (batch_cache.py) implement it; nothing else does. Prompt-cache lists and files live in
decoding/.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import mlx.core as mx

from ..errors import XGLMError
from .masks import Positions, causal, left_padding_mask


class LayerCache(ABC):
    """The cache protocol, and what every cache shares: rebuilding from a saved state, trimming from the
    end, positions of new tokens, their size in bytes.

    `meta_state` holds the constructor's arguments plus `offset`, so `from_state` rebuilds any cache type.
    """

    keys: mx.array | None
    values: mx.array | None
    offset: int

    @classmethod
    def from_state(cls, state: tuple[mx.array, mx.array] | tuple[()], meta_state: dict[str, int]):
        """A cache holding `state` (keys and values, or `()` when empty) and `meta_state`, as saved."""
        cache = cls(**{k: v for k, v in meta_state.items() if k != "offset"})
        if state:
            cache.state = state
        cache.meta_state = meta_state
        return cache

    def trim(self, n: int) -> int:
        """Drop the last `n` positions (at most all of them, none when not trimmable); returns how many."""
        if not self.is_trimmable():
            return 0
        n = min(self.offset, n)
        self.offset -= n
        return n

    @abstractmethod
    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store the new `keys` and `values` [B, heads, L, head_dim]; return all those to attend over."""

    @abstractmethod
    def make_mask(self, length: int, dtype=mx.float32):
        """The attention mask of `length` new queries over what `update_and_fetch` will return."""

    @abstractmethod
    def is_trimmable(self) -> bool:
        """Whether `trim` can drop positions from the end."""

    def make_positions(self, length: int) -> Positions:
        """Positions of `length` new tokens: they go on from `offset`."""
        return Positions.range(self.offset, length)

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


class KVCache(LayerCache):
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
        if self.keys is None:  # empty buffers of the right shape and dtype; `reserve` allocates
            self.keys, self.values = keys[..., :0, :], values[..., :0, :]
        self.reserve(keys.shape[2])
        self.offset = needed
        self.keys[..., prev:needed, :] = keys
        self.values[..., prev:needed, :] = values
        return self.keys[..., :needed, :], self.values[..., :needed, :]

    def reserve(self, length: int) -> None:
        """Make room in the buffers (which exist once the cache holds a token) for `length` more positions."""
        prev = self.offset
        if prev + length <= self.keys.shape[2]:
            return
        B, H, _, D = self.keys.shape
        grow = ((length + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((B, H, grow, D), self.keys.dtype)
        new_v = mx.zeros((B, H, grow, self.values.shape[3]), self.values.dtype)
        if prev == 0:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
            self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)

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

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> QuantizedKVCache:
        """A `QuantizedKVCache` holding these keys and values, quantized `bits` bits per `group_size`."""
        quantized = QuantizedKVCache(group_size, bits)
        if self.keys is not None and self.offset:
            quantized.update_and_fetch(*self.state)
        return quantized


class RotatingKVCache(LayerCache):
    """A window of the last `max_size` positions of one layer, in a ring buffer of at most `max_size` slots.

    `offset` keeps counting every token seen: XGLM adds absolute sinusoid positions to the embeddings, so
    the model reads positions from it while old keys are overwritten. Positions live inside the keys, so
    attention does not care in which slot a key sits; each query sees the `max_size` most recent positions,
    itself included.
    """

    step = 256

    def __init__(self, max_size: int):
        if not (isinstance(max_size, int) and max_size >= 1):
            raise XGLMError(
                f"max_kv_size must be a positive number of tokens, got {max_size}", param="max_kv_size"
            )
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


class QuantizedKVCache(LayerCache):
    """Keys and values of one layer quantized `bits` bits per `group_size` values (mx.quantize), as mlx-lm's.

    `keys` and `values` are (packed ints, scales, biases) tuples, grown `step` positions at a time; scales
    and biases of a float32 model are kept in float16, so 4 bits at group 64 hold 0.28x the bytes of a
    float16 cache. `update_and_fetch` returns the keys and values dequantized, in the dtype they came in:
    the attention stays the model's own (on the CPU, dequantizing then the fused attention measured 190 ms
    against 842 ms for mx.quantized_matmul at 8 bits, 16 heads x 2,048 positions: docs/performance.md).
    """

    step = 256
    BITS = (2, 3, 4, 5, 6, 8)
    GROUP_SIZES = (32, 64, 128)

    def __init__(self, group_size: int = 64, bits: int = 8):
        if bits not in self.BITS:
            raise XGLMError(f"kv_bits must be one of {self.BITS}, got {bits}", param="kv_bits")
        if group_size not in self.GROUP_SIZES:
            raise XGLMError(
                f"kv_group_size must be one of {self.GROUP_SIZES}, got {group_size}", param="kv_group_size"
            )
        self.group_size, self.bits = group_size, bits
        self.keys = None
        self.values = None
        self.offset = 0
        self.dtype = mx.float32

    def _quantize(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        if x.shape[-1] % self.group_size:
            raise XGLMError(
                f"kv_group_size {self.group_size} does not divide the model's head_dim {x.shape[-1]}; "
                f"pick one of {self.GROUP_SIZES} that does",
                param="kv_group_size",
            )
        packed, scales, biases = mx.quantize(x, group_size=self.group_size, bits=self.bits)
        low = mx.float16 if x.dtype == mx.float32 else x.dtype
        return packed, scales.astype(low), biases.astype(low)

    def _dequantize(self, parts) -> mx.array:
        packed, scales, biases = (p[..., : self.offset, :] for p in parts)
        return mx.dequantize(packed, scales, biases, self.group_size, self.bits).astype(self.dtype)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev, length = self.offset, keys.shape[2]
        new_keys, new_values = self._quantize(keys), self._quantize(values)
        self.dtype = keys.dtype
        if self.keys is None or prev + length > self.keys[0].shape[2]:
            grow = ((length + self.step - 1) // self.step) * self.step

            def grown(parts):
                extra = [mx.zeros((*p.shape[:2], grow, p.shape[3]), p.dtype) for p in parts]
                if self.keys is None:
                    return tuple(extra)
                return tuple(
                    mx.concatenate([p[..., :prev, :], e], axis=2) for p, e in zip(parts, extra, strict=True)
                )

            self.keys = grown(new_keys if self.keys is None else self.keys)
            self.values = grown(new_values if self.values is None else self.values)
        self.offset = prev + length
        for stored, new in ((self.keys, new_keys), (self.values, new_values)):
            for part, value in zip(stored, new, strict=True):
                part[..., prev : self.offset, :] = value
        return self._dequantize(self.keys), self._dequantize(self.values)

    def make_mask(self, length: int, dtype=mx.float32):
        return causal(length)

    @property
    def state(self):
        if self.keys is None:
            return ()
        return tuple(tuple(p[..., : self.offset, :] for p in parts) for parts in (self.keys, self.values))

    @state.setter
    def state(self, value) -> None:
        self.keys, self.values = (tuple(parts) for parts in value)
        self.offset = self.keys[0].shape[2]

    @property
    def meta_state(self) -> dict[str, int]:
        return {"offset": self.offset, "group_size": self.group_size, "bits": self.bits}

    @meta_state.setter
    def meta_state(self, value: dict[str, int]) -> None:
        self.offset = int(value["offset"])

    def is_trimmable(self) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(p.nbytes for parts in (self.keys, self.values) for p in parts)


CACHE_TYPES = {"KVCache": KVCache, "RotatingKVCache": RotatingKVCache, "QuantizedKVCache": QuantizedKVCache}
