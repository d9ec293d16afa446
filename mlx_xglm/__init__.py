"""mlx-xglm: Meta's XGLM multilingual language models on Apple silicon with MLX."""

from importlib.metadata import PackageNotFoundError, version

from .convert import convert
from .errors import XGLMError
from .loading import load
from .model import XGLMConfig, XGLMForCausalLM, XGLMModel
from .tokenizer import XGLMTokenizer

try:
    __version__ = version("mlx-xglm")
except PackageNotFoundError:
    __version__ = "0.0.0"

__all__ = [
    "XGLMConfig",
    "XGLMError",
    "XGLMForCausalLM",
    "XGLMModel",
    "XGLMTokenizer",
    "__version__",
    "convert",
    "load",
]
