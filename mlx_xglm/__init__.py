"""mlx-xglm: Meta's XGLM multilingual language models on Apple silicon with MLX."""

from importlib.metadata import PackageNotFoundError, version

from .encoding import BatchEncoding
from .errors import XGLMError
from .forward import XGLMCausalLMOutput, XGLMModelOutput
from .loading import load
from .loss import causal_lm_loss
from .model import XGLMConfig, XGLMForCausalLM, XGLMModel
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
    "load",
]
