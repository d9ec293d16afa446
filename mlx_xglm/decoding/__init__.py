"""Decoding: KV caches, samplers and logits processors, the batched engine and the generation loops."""

from .batch import batch_generate
from .cache import load_prompt_cache, make_prompt_cache, save_prompt_cache
from .engine import BatchGenerator, BatchStats, Response
from .generate import generate, generate_step, stream_generate
from .sample_utils import make_logits_processors, make_sampler
from .speculative import check_draft_model, speculative_generate_step

__all__ = [
    "BatchGenerator",
    "BatchStats",
    "Response",
    "batch_generate",
    "check_draft_model",
    "generate",
    "generate_step",
    "load_prompt_cache",
    "make_logits_processors",
    "make_prompt_cache",
    "make_sampler",
    "save_prompt_cache",
    "speculative_generate_step",
    "stream_generate",
]
