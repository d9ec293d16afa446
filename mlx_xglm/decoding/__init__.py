"""Decoding: KV caches, samplers and logits processors, the batched engine, the generation loops and chat."""

from .batch import batch_generate
from .cache import (
    cached_tokens,
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    prompt_cache_max_kv_size,
    save_prompt_cache,
    trim_prompt_cache,
)
from .cache_files import model_fingerprint
from .chat import Conversation
from .engine import BatchGenerator, BatchStats, Response
from .generate import generate, generate_step, stream_generate
from .sample_utils import make_logits_processors, make_sampler
from .speculative import check_draft_model, speculative_generate_step

__all__ = [
    "BatchGenerator",
    "BatchStats",
    "Conversation",
    "Response",
    "batch_generate",
    "cached_tokens",
    "can_trim_prompt_cache",
    "check_draft_model",
    "generate",
    "generate_step",
    "load_prompt_cache",
    "make_logits_processors",
    "make_prompt_cache",
    "make_sampler",
    "prompt_cache_max_kv_size",
    "model_fingerprint",
    "save_prompt_cache",
    "speculative_generate_step",
    "stream_generate",
    "trim_prompt_cache",
]
