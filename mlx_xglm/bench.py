"""Measuring prompt and generation speed, peak memory and the memory-bandwidth ceiling of decoding."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .checkpoints.loading import DTYPES
from .checkpoints.quantize import quantize_model
from .checkpoints.tiny import TINY
from .decoding.generate import generate_step
from .errors import XGLMError
from .model.xglm import XGLMConfig, XGLMForCausalLM

# The shapes of the released checkpoints (XGLM.md), which share vocab 256008 and 2048 positions, and of the
# tiny checkpoint `mlx-xglm tiny` writes.
PRESETS = {
    "tiny": TINY,
    "564M": {"num_layers": 24, "d_model": 1024, "ffn_dim": 4096, "attention_heads": 16},
    "1.7B": {"num_layers": 24, "d_model": 2048, "ffn_dim": 8192, "attention_heads": 16},
    "2.9B": {"num_layers": 48, "d_model": 2048, "ffn_dim": 8192, "attention_heads": 16},
    "4.5B": {"num_layers": 48, "d_model": 2048, "ffn_dim": 16384, "attention_heads": 16},
    "7.5B": {"num_layers": 32, "d_model": 4096, "ffn_dim": 16384, "attention_heads": 32},
}


def preset_config(preset: str, layers: int | None = None) -> XGLMConfig:
    """The config of a released checkpoint's shape (`PRESETS`), keeping only `layers` layers when given."""
    if preset not in PRESETS:
        raise XGLMError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}", param="preset")
    shape = dict(PRESETS[preset])
    if layers is not None:
        if not 1 <= layers <= shape["num_layers"]:
            raise XGLMError(
                f"layers must be from 1 to {shape['num_layers']} (the {preset} preset's depth), got {layers}",
                param="layers",
            )
        shape["num_layers"] = layers
    return XGLMConfig(**shape)


def random_model(
    preset: str,
    layers: int | None = None,
    dtype: str = "float32",
    q_bits: int | None = None,
    q_group_size: int = 64,
) -> XGLMForCausalLM:
    """An XGLM model of a released checkpoint's shape with random weights (nothing is downloaded).

    `layers` keeps only the first N layers so large shapes fit small machines; `q_bits` quantizes every
    Linear and the tied embedding (which then serves as the quantized LM head).
    """
    model = XGLMForCausalLM(preset_config(preset, layers))
    model.set_dtype(DTYPES[dtype])
    if q_bits is not None:
        quantize_model(model, q_bits, q_group_size)
    mx.eval(model.parameters())
    model.eval()
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters one decoding step reads: every weight once (the tied embedding as the head)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Measured memory bandwidth in bytes/s: the best of `repeats` copies of a buffer (read + write).

    On the GPU an MLX copy; on the CPU a numpy memcpy, since MLX's CPU element-wise kernels run on one
    thread and would understate what the memory can deliver to the (multi-threaded) matmuls.
    """
    n = megabytes * 2**20 // 4
    if mx.default_device() == mx.gpu:
        src = mx.random.uniform(shape=(n,))
        mx.eval(src)

        def copy():
            mx.eval(src + 0)

    else:
        src = np.ones(n, np.float32)
        dst = np.zeros_like(src)

        def copy():
            np.copyto(dst, src)

    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        copy()
        best = min(best, time.perf_counter() - start)
    return 2 * n * 4 / best


@dataclass
class Trial:
    prompt_tps: float
    generation_tps: float
    ttft: float
    peak_memory: float


def run_trial(
    model: nn.Module, prompt_tokens: int, gen_tokens: int, vocab_size: int, step=generate_step
) -> Trial:
    """One timed generation from a random prompt: prefill, first token, then `gen_tokens - 1` more.

    `step` is the decoding loop, `generate_step(prompt, model, max_tokens=...)`: ours by default; the
    comparison script passes mlx-lm's to time it the same way.
    """
    prompt = mx.random.randint(4, vocab_size, (prompt_tokens,))
    mx.eval(prompt)
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    tokens = step(prompt, model, max_tokens=gen_tokens)
    next(tokens)
    first = time.perf_counter()
    count = 1 + sum(1 for _ in tokens)
    end = time.perf_counter()
    ttft = first - start
    decode_time = end - first
    return Trial(
        prompt_tps=prompt_tokens / ttft,
        generation_tps=(count - 1) / decode_time if count > 1 and decode_time > 0 else 0.0,
        ttft=ttft,
        peak_memory=mx.get_peak_memory() / 1e9,
    )


@dataclass
class BenchResult:
    config: dict
    trials: list[Trial] = field(default_factory=list)
    weight_bytes: int = 0
    bandwidth: float = 0.0

    def stat(self, name: str, how: str) -> float:
        values = [getattr(t, name) for t in self.trials]
        return min(values) if how == "min" else statistics.median(values)

    @property
    def ceiling_tps(self) -> float:
        """Decode tokens/s if every step only streamed the weights at the measured bandwidth."""
        return self.bandwidth / self.weight_bytes

    def summary(self) -> dict:
        """Medians over trials, plus the configuration and the ceiling: the JSON report."""
        generation = self.stat("generation_tps", "median")
        return {
            "prompt_tps": self.stat("prompt_tps", "median"),
            "generation_tps": generation,
            "ttft": self.stat("ttft", "median"),
            "peak_memory": self.stat("peak_memory", "median"),
            "ceiling_tps": self.ceiling_tps,
            "ceiling_fraction": generation / self.ceiling_tps,
            "weight_gb": self.weight_bytes / 1e9,
            "bandwidth_gbs": self.bandwidth / 1e9,
            "trials": [asdict(t) for t in self.trials],
            **self.config,
        }


def benchmark(
    model: nn.Module,
    config: dict,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    trials: int = 3,
    on_trial=None,
) -> BenchResult:
    """Warm up once, then time `trials` generations; `on_trial(i, trial)` is called after each."""
    for name, value in (("prompt_tokens", prompt_tokens), ("gen_tokens", gen_tokens), ("trials", trials)):
        if value < 1:
            raise XGLMError(f"{name} must be at least 1, got {value}", param=name)
    vocab_size = model.config.vocab_size
    result = BenchResult(config=config, weight_bytes=weight_bytes(model), bandwidth=copy_bandwidth())
    run_trial(model, min(prompt_tokens, 32), 4, vocab_size)
    for i in range(trials):
        trial = run_trial(model, prompt_tokens, gen_tokens, vocab_size)
        result.trials.append(trial)
        if on_trial is not None:
            on_trial(i, trial)
    return result
