"""XGLMConfig: the fields of a checkpoint's `config.json`, checked once when a config is made."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import mlx.nn as nn

from ..errors import XGLMError
from .config_checks import config_problem
from .elementwise import gelu
from .positions import POSITION_OFFSET

ACTIVATIONS = {
    "gelu": gelu,  # exact erf GELU, as transformers' "gelu" (vectorized on the CPU: elementwise.py)
    "gelu_new": nn.gelu_approx,  # tanh approximation
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


@dataclass
class XGLMConfig:
    """The fields and defaults of transformers' XGLMConfig (a checkpoint's `config.json`)."""

    vocab_size: int = 256008
    max_position_embeddings: int = 2048
    d_model: int = 1024
    ffn_dim: int = 4096
    num_layers: int = 24
    attention_heads: int = 16
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    layerdrop: float = 0.0
    init_std: float = 0.02
    scale_embedding: bool = True
    use_cache: bool = True
    decoder_start_token_id: int = 2
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    # False only for checkpoints whose lm_head.weight differs from the embedding (kept as its own matrix).
    tie_word_embeddings: bool = True

    def __post_init__(self):
        problem = config_problem(self, ACTIVATIONS, POSITION_OFFSET)
        if problem is not None:
            field, message = problem
            raise XGLMError(f"config field {field} {message}, got {getattr(self, field)!r}", param=field)

    @classmethod
    def from_dict(cls, config: dict, source: str | Path | None = None) -> XGLMConfig:
        """Build a config from a `config.json` mapping, ignoring keys XGLM does not define.

        Every field is checked: a bad one is an XGLMError naming the field and `source`, its file.
        """
        fields = inspect.signature(cls).parameters
        try:
            return cls(**{k: v for k, v in config.items() if k in fields})
        except XGLMError as e:
            if source is None:
                raise
            raise XGLMError(f"{source}: {e}", param=e.param) from None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attention_heads
