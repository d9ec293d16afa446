"""mlx-xglm: Meta's XGLM multilingual language models on Apple silicon with MLX."""

from importlib.metadata import PackageNotFoundError, version

from .checkpoints import convert, load, sharded_load
from .decoding import (
    BatchGenerator,
    batch_generate,
    can_trim_prompt_cache,
    generate,
    generate_step,
    load_prompt_cache,
    make_logits_processors,
    make_prompt_cache,
    make_sampler,
    model_fingerprint,
    save_prompt_cache,
    speculative_generate_step,
    stream_generate,
    trim_prompt_cache,
)
from .errors import XGLMError
from .evaluation import loglikelihood, perplexity, rank, score
from .model import XGLMCausalLMOutput, XGLMConfig, XGLMForCausalLM, XGLMModel, XGLMModelOutput, causal_lm_loss
from .tokenization import BatchEncoding, XGLMTokenizer

try:
    __version__ = version("mlx-xglm")
except PackageNotFoundError:
    __version__ = "0.0.0"

__all__ = [
    "BatchGenerator",
    "BatchEncoding",
    "XGLMCausalLMOutput",
    "XGLMModelOutput",
    "causal_lm_loss",
    "XGLMConfig",
    "XGLMError",
    "XGLMForCausalLM",
    "XGLMModel",
    "XGLMTokenizer",
    "__version__",
    "batch_generate",
    "can_trim_prompt_cache",
    "convert",
    "generate",
    "generate_step",
    "speculative_generate_step",
    "load",
    "load_prompt_cache",
    "loglikelihood",
    "make_logits_processors",
    "make_prompt_cache",
    "make_sampler",
    "model_fingerprint",
    "perplexity",
    "rank",
    "save_prompt_cache",
    "score",
    "sharded_load",
    "stream_generate",
    "trim_prompt_cache",
]
