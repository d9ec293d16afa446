"""Measuring prompt and generation speed, peak memory and the memory-bandwidth ceiling of decoding."""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .checkpoints.loading import DTYPES
from .checkpoints.quantize import quantize_model
from .checkpoints.tiny import TINY
from .decoding.cache import make_prompt_cache
from .decoding.generate import generate_step
from .decoding.speculative import speculative_generate_step
from .errors import XGLMError
from .model.xglm import XGLMConfig, XGLMForCausalLM
from .settings import on_gpu

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


def make_agreeing_draft(model: XGLMForCausalLM, layers: int) -> XGLMForCausalLM:
    """A draft model that agrees with `model`: the model's layers from `layers` on become identities
    (their out_proj and fc2 zeroed, quantization scales included) and the draft is its first `layers`
    layers with the same embedding, final LayerNorm and head. `model` is changed in place; its decoding
    cost stays that of every layer. For measuring speculative decoding at full acceptance.
    """
    if not 1 <= layers < len(model.layers):
        raise XGLMError(
            f"the draft must keep fewer layers than the model's {len(model.layers)}, got {layers}",
            param="draft_layers",
        )
    for layer in model.layers[layers:]:
        for module in (layer.self_attn.out_proj, layer.fc2):
            module.update({name: mx.zeros_like(value) for name, value in module.parameters().items()})
    draft = XGLMForCausalLM(XGLMConfig(**{**model.config.__dict__, "num_layers": layers}))
    draft.model.embed_tokens = model.model.embed_tokens
    draft.model.layers = model.model.layers[:layers]
    draft.model.layer_norm = model.model.layer_norm
    if not model.config.tie_word_embeddings:
        draft.lm_head = model.lm_head
    mx.eval(model.parameters())
    draft.eval()
    return draft


def blas_library() -> str:
    """The BLAS library this process has loaded for MLX's CPU matmuls, read from /proc/self/maps on Linux.

    A preloaded Intel MKL or OpenBLAS (LD_PRELOAD) takes the calls before the reference BLAS that the
    mlx[cpu] wheel bundles, so they are named first; numpy's private OpenBLAS copy is not MLX's. On macOS,
    MLX uses Accelerate.
    """
    if sys.platform == "darwin":
        return "Accelerate"
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return "unknown"
    paths = sorted({line.split()[-1] for line in lines if line.split()[-1].startswith("/")})
    for label, test in [
        ("Intel MKL", lambda path: "/libmkl_rt" in path),
        ("OpenBLAS", lambda path: "openblas" in path and "scipy_openblas" not in path),
        ("reference BLAS", lambda path: "/libblas" in path),
    ]:
        found = [p for p in paths if test(p.lower())]
        if found:
            return f"{label} ({found[0]})"
    return "unknown"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters one decoding step reads: every weight once (the tied embedding as the head)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Measured memory bandwidth in bytes/s: the best of `repeats` copies of a buffer (read + write).

    On the GPU an MLX copy; on the CPU a numpy memcpy, since MLX's CPU element-wise kernels run on one
    thread and would understate what the memory can deliver to the (multi-threaded) matmuls.
    """
    n = megabytes * 2**20 // 4
    if on_gpu():
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
    seconds: float = 0.0  # prefill and every generated token
    # Speculative trials only: accepted draft tokens / proposed draft tokens.
    acceptance: float | None = None


def acceptance_rate(from_draft: list[bool], num_draft_tokens: int) -> float:
    """Accepted / proposed draft tokens, from the `from_draft` flags of one speculative generation.

    A round proposes `num_draft_tokens` tokens (fewer when fewer are left to generate) and ends with the
    model's own token.
    """
    proposed = 0
    total = len(from_draft)
    # A round starts with the first token and after each token of the model's own.
    for produced in range(total):
        if produced == 0 or not from_draft[produced - 1]:
            proposed += min(num_draft_tokens, total - produced - 1)
    accepted = sum(from_draft)
    return accepted / proposed if proposed else 0.0


def run_trial(
    model: nn.Module,
    prompt_tokens: int,
    gen_tokens: int,
    vocab_size: int,
    step=generate_step,
    num_draft_tokens: int | None = None,
) -> Trial:
    """One timed generation from a random prompt: prefill, first token, then `gen_tokens - 1` more.

    `step` is the decoding loop, `generate_step(prompt, model, max_tokens=...)`: ours by default; the
    comparison script passes mlx-lm's to time it the same way. For a speculative `step`, which yields
    `from_draft` flags, pass its `num_draft_tokens` to have the acceptance rate measured.
    """
    prompt = mx.random.randint(4, vocab_size, (prompt_tokens,))
    mx.eval(prompt)
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    tokens = step(prompt, model, max_tokens=gen_tokens)
    flags = [next(tokens)[2:]]
    first = time.perf_counter()
    flags += [out[2:] for out in tokens]
    end = time.perf_counter()
    ttft = first - start
    decode_time = end - first
    count = len(flags)
    acceptance = None
    if num_draft_tokens is not None:
        acceptance = acceptance_rate([f[0] for f in flags], num_draft_tokens)
    return Trial(
        prompt_tps=prompt_tokens / ttft,
        generation_tps=(count - 1) / decode_time if count > 1 and decode_time > 0 else 0.0,
        ttft=ttft,
        peak_memory=mx.get_peak_memory() / 1e9,
        seconds=end - start,
        acceptance=acceptance,
    )


def graph_time(model: nn.Module, steps: int = 16) -> float:
    """Median seconds the host spends building one decoding step's graph (the model call and the argmax,
    before anything is evaluated): the per-token cost that bounds small models on a fast GPU."""
    cache = make_prompt_cache(model)
    y = mx.argmax(model(mx.array([[2, 100, 200, 300]]), cache=cache, logits_to_keep=1)[:, -1], axis=-1)
    mx.eval(y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        y = mx.argmax(model(y[None], cache=cache, logits_to_keep=1)[:, -1], axis=-1)
        times.append(time.perf_counter() - start)
        mx.eval(y)
    return statistics.median(times)


@dataclass
class BenchResult:
    config: dict
    trials: list[Trial] = field(default_factory=list)
    weight_bytes: int = 0
    bandwidth: float = 0.0
    graph_seconds: float = 0.0
    # With a draft model: the plain-decoding trials run alternately with the speculative ones.
    plain_trials: list[Trial] = field(default_factory=list)

    def stat(self, name: str, how: str, trials: list[Trial] | None = None) -> float:
        values = [getattr(t, name) for t in (self.trials if trials is None else trials)]
        return min(values) if how == "min" else statistics.median(values)

    @property
    def ceiling_tps(self) -> float:
        """Decode tokens/s if every step only streamed the weights at the measured bandwidth."""
        return self.bandwidth / self.weight_bytes

    def summary(self) -> dict:
        """Medians over trials, plus the configuration and the ceiling: the JSON report."""
        generation = self.stat("generation_tps", "median")
        summary = {
            "prompt_tps": self.stat("prompt_tps", "median"),
            "generation_tps": generation,
            "ttft": self.stat("ttft", "median"),
            "peak_memory": self.stat("peak_memory", "median"),
            "ceiling_tps": self.ceiling_tps,
            "ceiling_fraction": generation / self.ceiling_tps,
            "weight_gb": self.weight_bytes / 1e9,
            "bandwidth_gbs": self.bandwidth / 1e9,
            "graph_ms_per_token": self.graph_seconds * 1e3,
            "trials": [asdict(t) for t in self.trials],
            **self.config,
        }
        if self.plain_trials:
            summary["acceptance"] = self.stat("acceptance", "median")
            summary["plain_generation_tps"] = self.stat("generation_tps", "median", self.plain_trials)
            # Whole generations (prefill included), so the tokens of the first round count too.
            plain_seconds = self.stat("seconds", "median", self.plain_trials)
            summary["speculative_speedup"] = plain_seconds / self.stat("seconds", "median")
            summary["plain_trials"] = [asdict(t) for t in self.plain_trials]
        return summary


def benchmark(
    model: nn.Module,
    config: dict,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    trials: int = 3,
    on_trial=None,
    draft_model: nn.Module | None = None,
    num_draft_tokens: int = 3,
) -> BenchResult:
    """Warm up once, then time `trials` generations; `on_trial(i, trial)` is called after each.

    With `draft_model`, each trial is a speculative generation, run alternately with a plain one of the
    same prompt length so that `summary()` reports the speedup and the draft's acceptance rate;
    `on_trial(i, trial, plain)` then also gets the plain trial.
    """
    for name, value in (("prompt_tokens", prompt_tokens), ("gen_tokens", gen_tokens), ("trials", trials)):
        if value < 1:
            raise XGLMError(f"{name} must be at least 1, got {value}", param=name)
    vocab_size = model.config.vocab_size
    result = BenchResult(config=config, weight_bytes=weight_bytes(model), bandwidth=copy_bandwidth())
    run_trial(model, min(prompt_tokens, 32), 4, vocab_size)
    result.graph_seconds = graph_time(model)
    speculative = None
    if draft_model is not None:
        speculative = partial(
            speculative_generate_step, draft_model=draft_model, num_draft_tokens=num_draft_tokens
        )
        run_trial(model, min(prompt_tokens, 32), 4, vocab_size, speculative, num_draft_tokens)
    for i in range(trials):
        if speculative is None:
            trial = run_trial(model, prompt_tokens, gen_tokens, vocab_size)
            result.trials.append(trial)
            if on_trial is not None:
                on_trial(i, trial)
            continue
        # Alternate which one goes first, so that machine noise hits both alike.
        runs = [(result.plain_trials, generate_step, None), (result.trials, speculative, num_draft_tokens)]
        for trials_list, step, drafts in runs[i % 2 :] + runs[: i % 2]:
            trials_list.append(run_trial(model, prompt_tokens, gen_tokens, vocab_size, step, drafts))
        if on_trial is not None:
            on_trial(i, result.trials[-1], result.plain_trials[-1])
    return result
