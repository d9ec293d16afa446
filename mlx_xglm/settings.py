"""The switches that choose between speed paths, in one place, read when called (never at import time).

Today one: whether MLX runs on a GPU (Metal or CUDA) or on its CPU backend, whose elementwise kernels
are not vectorized; paths that differ by backend ask `on_gpu()` here rather than the device themselves.
"""

from __future__ import annotations

import mlx.core as mx


def on_gpu() -> bool:
    """Whether the default device is a GPU; `mx.set_default_device` changes the answer at once."""
    return mx.default_device() == mx.gpu
