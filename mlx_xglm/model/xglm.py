"""XGLM decoder in MLX: the math of transformers' XGLMModel / XGLMForCausalLM.

The network reads top to bottom in the order data flows: attention, block, model, head (the config and the
position table have files of their own: config.py, positions.py). It knows nothing about files, sampling
or the terminal; `sanitize` is where checkpoint names meet modules.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache
from .config import ACTIVATIONS, XGLMConfig
from .dropout import Dropout, dropout_key, keyed_call, layer_key
from .elementwise import softmax
from .forward import causal_lm_forward, model_forward
from .masks import Positions, additive_mask, causal
from .positions import XGLMSinusoidalPositionalEmbedding
from .sharding import pipeline, shard


class XGLMAttention(nn.Module):
    """Multi-head self-attention; softmax in float32 on both branches (transformers #18049: NaN in fp16)."""

    def __init__(self, config: XGLMConfig):
        super().__init__()
        d = config.d_model
        self.num_heads = config.attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.dropout_p = config.attention_dropout
        self.dropout = Dropout(config.attention_dropout)

    def __call__(self, x: mx.array, mask=None, cache=None, head_mask=None, attentions=None) -> mx.array:
        """Attention output [B, L, d_model]; `mask` is None, "causal", boolean or additive over [L, S].

        `head_mask` [heads] scales each head's probabilities; a list `attentions` receives them [B, heads,
        L, S]. Either, or attention dropout in training mode, spells the attention out; otherwise MLX's
        attention kernel (`mx.fast.scaled_dot_product_attention`) runs.
        """
        B, L, _ = x.shape
        q, k, v = (
            proj(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = self.attend(q, k, v, mask, head_mask, attentions)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def attend(self, q, k, v, mask=None, head_mask=None, attentions=None) -> mx.array:
        """Each head's attention output [B, heads, L, head_dim]; the options are those of `__call__`."""
        L = q.shape[2]
        if attentions is None and head_mask is None and not (self.training and self.dropout_p > 0):
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        scores = ((q * self.scale) @ k.swapaxes(-1, -2)).astype(mx.float32)
        mask = additive_mask(mask, L, k.shape[2], mx.float32)
        probs = softmax(scores if mask is None else scores + mask)
        if head_mask is not None:
            probs = probs * head_mask.astype(mx.float32)[None, :, None, None]
        probs = probs.astype(v.dtype)
        if attentions is not None:
            attentions.append(probs)
        return self.dropout(probs) @ v


class XGLMDecoderLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(LN(x)), then x + fc2(act(fc1(LN(x)))); dropout in training only."""

    def __init__(self, config: XGLMConfig):
        super().__init__()
        self.self_attn = XGLMAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model, eps=1e-5)
        self.fc1 = nn.Linear(config.d_model, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model, eps=1e-5)
        self.activation = ACTIVATIONS[config.activation_function]
        self.dropout = Dropout(config.dropout)
        self.activation_dropout = Dropout(config.activation_dropout)

    def __call__(self, x: mx.array, mask=None, cache=None, head_mask=None, attentions=None) -> mx.array:
        """The block's output [B, L, d_model]; the options are those of `XGLMAttention.__call__`."""
        h = self.self_attn(self.self_attn_layer_norm(x), mask, cache, head_mask, attentions)
        x = x + self.dropout(h)
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
        self.dropout = Dropout(config.dropout)
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
        length = (inputs if inputs_embeds is None else inputs_embeds).shape[1]
        if position_ids is None:
            positions = Positions.range(0, length) if cache[0] is None else cache[0].make_positions(length)
        else:
            positions = position_ids if isinstance(position_ids, Positions) else Positions.given(position_ids)
        h = self.embed(inputs, positions, inputs_embeds)
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

    def embed(self, inputs: mx.array | None, positions: Positions, inputs_embeds: mx.array | None = None):
        """The decoder's input: scaled token embeddings (or `inputs_embeds` as given) plus positions."""
        h = self.embed_tokens(inputs) if inputs_embeds is None else inputs_embeds
        scale = self.embed_scale if inputs_embeds is None else 1.0
        h = h * scale + self.embed_positions(positions, h.dtype)
        if not self.training:
            return h
        with dropout_key(layer_key()):  # keyed as the layers' dropout: per row, the same on any rank
            return self.dropout(h)

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

    def shard(self, group=None) -> None:
        """Tensor parallelism over `group` (default: the launcher's), in place; see sharding.py."""
        shard(self, group or mx.distributed.init())

    def pipeline(self, group=None) -> None:
        """Keep only this rank's slice of the layers (default group: the launcher's); see sharding.py."""
        pipeline(self, group or mx.distributed.init())

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
