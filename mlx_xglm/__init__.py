"""mlx-xglm: Meta's XGLM multilingual language models on Apple silicon with MLX."""

from importlib.metadata import PackageNotFoundError, version

from .batch import batch_generate
from .cache import load_prompt_cache, make_prompt_cache, save_prompt_cache
from .encoding import BatchEncoding
from .errors import XGLMError
from .forward import XGLMCausalLMOutput, XGLMModelOutput
from .generate import generate, generate_step, stream_generate
from .loading import load
from .loss import causal_lm_loss
from .model import XGLMConfig, XGLMForCausalLM, XGLMModel
from .sample_utils import make_logits_processors, make_sampler
from .tokenizer import XGLMTokenizer

try:
    __version__ = version("mlx-xglm")
except PackageNotFoundError:
    __version__ = "0.0.0"

__all__ = [
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
    "generate",
    "generate_step",
    "load",
    "load_prompt_cache",
    "make_logits_processors",
    "make_prompt_cache",
    "make_sampler",
    "save_prompt_cache",
    "stream_generate",
]
