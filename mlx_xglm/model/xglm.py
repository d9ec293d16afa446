"""XGLM decoder in MLX: the math of transformers' XGLMModel / XGLMForCausalLM.

The network reads top to bottom in the order data flows: config, positions, attention, block, model, head.
It knows nothing about files, sampling or the terminal; `sanitize` is where checkpoint names meet modules.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..decoding.cache import KVCache
from ..errors import XGLMError
from .config_checks import config_problem
from .dropout import Dropout, keyed_call
from .forward import causal_lm_forward, model_forward
from .masks import Positions, additive_mask, causal

# fairseq reserves rows 0 and 1 of the position table (row 1 is the padding row), so the first real token
# reads row 2.
POSITION_OFFSET = 2


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


ACTIVATIONS = {
    "gelu": nn.gelu,  # exact erf GELU, as transformers' "gelu"
    "gelu_new": nn.gelu_approx,  # tanh approximation
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


def sinusoidal_table(num_positions: int, dim: int, padding_idx: int) -> np.ndarray:
    """fairseq's sinusoid table: sin and cos halves concatenated, computed in float32 like torch."""
    half = dim // 2
    # fairseq divides by (half - 1), not half: the last frequency is exactly 1/10000.
    step = math.log(10000) / (half - 1)
    freqs = np.exp(np.arange(half, dtype=np.float32) * np.float32(-step))
    angles = np.arange(num_positions, dtype=np.float32)[:, None] * freqs[None, :]
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if dim % 2 == 1:
        table = np.concatenate([table, np.zeros((num_positions, 1), np.float32)], axis=1)
    table[padding_idx] = 0.0
    return table


class XGLMSinusoidalPositionalEmbedding(nn.Module):
    """Fixed sinusoidal positions; the table grows on demand instead of failing past its size."""

    def __init__(self, num_positions: int, dim: int, padding_idx: int):
        super().__init__()
        self.dim = dim
        self.padding_idx = padding_idx
        # Underscored: a buffer, not a parameter, so it is neither loaded, saved nor quantized.
        self._table = mx.array(sinusoidal_table(num_positions + POSITION_OFFSET, dim, padding_idx))

    def __call__(self, positions: Positions) -> mx.array:
        """Rows for `positions`: [L, dim] for a shared range, else [B, L, dim]; the table grows to fit."""
        end = positions.end + POSITION_OFFSET
        if end > self._table.shape[0]:
            size = max(end, 2 * self._table.shape[0])
            self._table = mx.array(sinusoidal_table(size, self.dim, self.padding_idx))
        if positions.ids is None:
            return self._table[positions.start + POSITION_OFFSET : end]
        return self._table[positions.ids + POSITION_OFFSET]


class XGLMAttention(nn.Module):
    """Multi-head self-attention; softmax in float32 on both branches (transformers #18049: NaN in fp16)."""

    def __init__(self, config: XGLMConfig):
        super().__init__()
        d = config.d_model
        self.num_heads = config.attention_heads
        self.head_dim = config.head_dim
        if self.head_dim * self.num_heads != d:
            raise ValueError(f"d_model ({d}) must be divisible by attention_heads ({self.num_heads})")
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.dropout_p = config.attention_dropout
        self.dropout = Dropout(config.attention_dropout)

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Queries, keys and values [B, heads, L, head_dim] of `x`."""
        B, L, _ = x.shape
        return tuple(
            proj(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )

    def __call__(self, x: mx.array, mask=None, cache=None, head_mask=None, attentions=None) -> mx.array:
        """Attention output [B, L, d_model]; `mask` is None, "causal", boolean or additive over [L, S].

        `head_mask` [heads] scales each head's probabilities; a list `attentions` receives them [B, heads,
        L, S]. Either, or attention dropout in training mode, spells the attention out; otherwise the fused
        kernel runs.
        """
        B, L, _ = x.shape
        q, k, v = self.project(x)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if attentions is None and head_mask is None and not (self.training and self.dropout_p > 0):
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        else:
            scores = ((q * self.scale) @ k.swapaxes(-1, -2)).astype(mx.float32)
            mask = additive_mask(mask, L, k.shape[2], mx.float32)
            probs = mx.softmax(scores if mask is None else scores + mask, axis=-1)
            if head_mask is not None:
                probs = probs * head_mask.astype(mx.float32)[None, :, None, None]
            probs = probs.astype(v.dtype)
            if attentions is not None:
                attentions.append(probs)
            out = self.dropout(probs) @ v
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class XGLMDecoderLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(LN(x)), then x + fc2(act(fc1(LN(x)))); dropout in training only."""

    def __init__(self, config: XGLMConfig):
        super().__init__()
        if config.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"activation_function {config.activation_function!r} is not supported; "
                f"use one of {sorted(ACTIVATIONS)}"
            )
        self.self_attn = XGLMAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model, eps=1e-5)
        self.fc1 = nn.Linear(config.d_model, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model, eps=1e-5)
        self.activation = ACTIVATIONS[config.activation_function]
        self.dropout = Dropout(config.dropout)
        self.activation_dropout = Dropout(config.activation_dropout)

    def __call__(self, x: mx.array, mask=None, cache=None, head_mask=None, attentions=None) -> mx.array:
        """The block's output; the options are those of `XGLMAttention.__call__`."""
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), mask, cache, head_mask, attentions))
        h = self.activation_dropout(self.activation(self.fc1(self.final_layer_norm(x))))
        return x + self.dropout(self.fc2(h))


class XGLMModel(nn.Module):
    """Token and position embeddings, the decoder layers and the final LayerNorm."""

    def __init__(self, config: XGLMConfig):
        super().__init__()
        self.config = config
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_positions = XGLMSinusoidalPositionalEmbedding(
            config.max_position_embeddings, config.d_model, config.pad_token_id
        )
        self.layers = [XGLMDecoderLayer(config) for _ in range(config.num_layers)]
        self.layer_norm = nn.LayerNorm(config.d_model, eps=1e-5)
        self.dropout = nn.Dropout(config.dropout)
        # Training only: recompute each layer in the backward pass instead of keeping its activations.
        self.grad_checkpoint = False

    def __call__(
        self,
        inputs: mx.array | None = None,
        cache=None,
        mask=None,
        position_ids: mx.array | None = None,
        *,
        inputs_embeds: mx.array | None = None,
        head_mask: mx.array | None = None,
        hidden_states: list | None = None,
        attentions: list | None = None,
    ) -> mx.array:
        """Final hidden states [B, L, d_model] for token ids [B, L] (or scaled `inputs_embeds`).

        `cache` is a list of per-layer caches (or None); `mask` an attention mask (boolean or additive)
        broadcastable to [B, heads, L, S], by default the cache's own (plain causal without one);
        `position_ids` [B, L] 0-based positions (or `Positions`), by default the cache's. `head_mask`
        [layers, heads] scales attention probabilities; lists `hidden_states` and `attentions` receive
        each layer's input (then the output) and attention probabilities. In training mode dropout and
        layerdrop act, each layer's dropout drawing from one key per step (see dropout.py), and with
        `grad_checkpoint` set the layers are recomputed in the backward pass (exactly, masks included).
        """
        cache = cache if cache is not None else [None] * len(self.layers)
        h = self.embed_tokens(inputs) * self.embed_scale if inputs_embeds is None else inputs_embeds
        length = h.shape[1]
        if position_ids is None:
            positions = Positions.range(0, length) if cache[0] is None else cache[0].make_positions(length)
        else:
            positions = position_ids if isinstance(position_ids, Positions) else Positions.given(position_ids)
        h = self.dropout(h + self.embed_positions(positions).astype(h.dtype))
        if mask is None:
            mask = causal(length) if cache[0] is None else cache[0].make_mask(length, h.dtype)
        for i, (layer, layer_cache) in enumerate(zip(self.layers, cache, strict=True)):
            if hidden_states is not None:
                hidden_states.append(h)
            # fairseq's LayerDrop: in training, skip the whole layer with this probability.
            layerdrop = self.config.layerdrop if self.training else 0.0
            if layerdrop > 0 and mx.random.uniform().item() < layerdrop:
                continue
            args = (mask, layer_cache, None if head_mask is None else head_mask[i], attentions)
            if self.training:
                # Exact checkpointing: the rerun in the backward pass redraws the first run's masks.
                checkpoint = self.grad_checkpoint and layer_cache is None and attentions is None
                h = keyed_call(layer, checkpoint, h, *args)
            else:
                h = layer(h, *args)
        h = self.layer_norm(h)
        if hidden_states is not None:
            hidden_states.append(h)
        return h

    # The full forward (attention masks, hidden states, attentions, head_mask) packaged as transformers does.
    forward = model_forward


class XGLMForCausalLM(nn.Module):
    """XGLMModel plus the language-model head, tied to the token embedding unless the config unties it."""

    def __init__(self, config: XGLMConfig):
        super().__init__()
        self.config = config
        self.model_type = "xglm"
        self.model = XGLMModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        cache=None,
        mask=None,
        position_ids: mx.array | None = None,
        logits_to_keep: int = 0,
    ) -> mx.array:
        """Logits [B, L, vocab_size] for token ids [B, L]; see `XGLMModel.__call__` for the options.

        `logits_to_keep=n` (as in transformers) returns the logits of the last n positions only: the head
        is a d_model x vocab_size matmul per position, so a prompt's first token needs just one.
        """
        h = self.model(inputs, cache=cache, mask=mask, position_ids=position_ids)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.head(h)

    def head(self, h: mx.array) -> mx.array:
        """The LM head: the (possibly quantized) token embedding used as a linear map, or an untied head."""
        if not self.config.tie_word_embeddings:
            return self.lm_head(h)
        return self.model.embed_tokens.as_linear(h)

    # The full forward with `labels` -> `loss`; see forward.py.
    forward = causal_lm_forward

    @property
    def layers(self) -> list[XGLMDecoderLayer]:
        return self.model.layers

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map checkpoint tensor names to module names.

        Drops the saved sinusoid table (recomputed here) and, when the head is tied to the embedding,
        `lm_head.*`; adds the `model.` prefix that checkpoints of the bare XGLMModel lack.
        """
        out = {}
        for name, value in weights.items():
            is_head = name.startswith("lm_head.")
            if (is_head and self.config.tie_word_embeddings) or name.endswith("embed_positions.weights"):
                continue
            if not name.startswith("model.") and not is_head:
                name = "model." + name
            out[name] = value
        return out
