"""The model: config, MLX modules, the transformers-style full `forward`, and the causal-LM loss."""

from .forward import XGLMCausalLMOutput, XGLMModelOutput
from .loss import causal_lm_loss
from .xglm import XGLMConfig, XGLMForCausalLM, XGLMModel

__all__ = [
    "XGLMCausalLMOutput",
    "XGLMConfig",
    "XGLMForCausalLM",
    "XGLMModel",
    "XGLMModelOutput",
    "causal_lm_loss",
]
