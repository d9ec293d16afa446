"""The full forward of XGLMModel and XGLMForCausalLM: transformers' documented options on MLX arrays.

`model(inputs, cache)` in model.py is the lean path for decoding. `model.forward(...)` is for scripts and
training: attention masks for padded batches, `inputs_embeds`, hidden states and attention probabilities of
every layer, `head_mask`, the loss, and dropout/layerdrop in training mode. It reuses the same submodules, so
both paths read the same weights; in eval mode without attentions or head_mask it runs the same fused
attention kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..decoding.cache import KVCache
from ..errors import XGLMError
from .loss import causal_lm_loss


@dataclass
class XGLMModelOutput:
    """What `XGLMModel.forward` returns (transformers' BaseModelOutputWithPastAndCrossAttentions).

    `hidden_states` (with `output_hidden_states`): the embedding output, then the input of every later
    layer, and last the final LayerNorm's output, num_layers + 1 arrays [B, L, d_model], as transformers
    returns them. `attentions` (with `output_attentions`): per-layer probabilities [B, heads, L, S].
    `cache`: the per-layer KV caches used (with `use_cache` or a given `cache`), else None.
    """

    last_hidden_state: mx.array
    cache: list | None = None
    hidden_states: tuple[mx.array, ...] | None = None
    attentions: tuple[mx.array, ...] | None = None


@dataclass
class XGLMCausalLMOutput:
    """What `XGLMForCausalLM.forward` returns (transformers' CausalLMOutputWithCrossAttentions).

    `loss` is a scalar when `labels` were given; the other fields are those of XGLMModelOutput.
    """

    logits: mx.array
    loss: mx.array | None = None
    cache: list | None = None
    hidden_states: tuple[mx.array, ...] | None = None
    attentions: tuple[mx.array, ...] | None = None


def dropout(x: mx.array, p: float, training: bool) -> mx.array:
    """Inverted dropout with probability `p`, only when `training`."""
    if not training or p <= 0:
        return x
    keep = mx.random.bernoulli(1 - p, x.shape)
    return mx.where(keep, x / (1 - p), mx.zeros_like(x))


def _as_array(value, name: str, ndim: int) -> mx.array | None:
    if value is None:
        return None
    value = value if isinstance(value, mx.array) else mx.array(value)
    if value.ndim != ndim:
        raise XGLMError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def padding_mask(attention_mask: mx.array, length: int, offset: int) -> mx.array:
    """Boolean [B, 1, L, S] mask (True = may attend) from a [B, S] mask of 1/0 over past + current keys.

    Causal, pads hidden as keys. Every query may still see itself, so a pad query never has an empty row
    (its output is meaningless but finite, and it cannot leak NaN into real tokens through the values).
    """
    keys = mx.arange(attention_mask.shape[1])
    queries = mx.arange(offset, offset + length)[:, None]
    causal = keys[None, :] <= queries
    real = attention_mask[:, None, None, :].astype(mx.bool_)
    return (causal & real) | (keys[None, :] == queries)


def _positions(attention_mask: mx.array | None, batch: int, length: int, offset: int) -> mx.array:
    if attention_mask is None:
        return mx.broadcast_to(mx.arange(offset, offset + length)[None], (batch, length))
    # Counted over real tokens only, so a left-padded row reads the positions of its unpadded self; pads
    # get -1, which reads the table's zero row (fairseq's padding row).
    counted = mx.cumsum(attention_mask.astype(mx.int32), axis=1)[:, offset:] - 1
    return mx.where(attention_mask[:, offset:] > 0, counted, -1)


def explicit_attention(attn, x, mask, cache, layer_head_mask, dropout_p: float, training: bool):
    """Attention with the probabilities in hand: softmax in float32, head mask, attention dropout."""
    q, k, v = attn.project_heads(x)
    if cache is not None:
        k, v = cache.update_and_fetch(k, v)
    scores = ((q * attn.scale) @ k.swapaxes(-1, -2)).astype(mx.float32)
    if mask is not None:
        scores = mx.where(mask, scores, mx.array(-mx.inf, mx.float32))
    probs = mx.softmax(scores, axis=-1)
    if layer_head_mask is not None:
        probs = probs * layer_head_mask.astype(mx.float32)[None, :, None, None]
    probs = probs.astype(v.dtype)
    out = dropout(probs, dropout_p, training) @ v
    B, _, L, _ = out.shape
    return attn.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1)), probs


def _decoder_layer(layer, h, mask, cache, layer_head_mask, explicit: bool, config, training: bool):
    x = layer.self_attn_layer_norm(h)
    if explicit:
        out, probs = explicit_attention(
            layer.self_attn, x, mask, cache, layer_head_mask, config.attention_dropout, training
        )
    else:
        out, probs = layer.self_attn(x, mask, cache), None
    h = h + dropout(out, config.dropout, training)
    x = layer.activation(layer.fc1(layer.final_layer_norm(h)))
    x = layer.fc2(dropout(x, config.activation_dropout, training))
    return h + dropout(x, config.dropout, training), probs


def model_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    cache: list[KVCache] | None = None,
    inputs_embeds: mx.array | None = None,
    use_cache: bool | None = None,
    output_attentions: bool = False,
    output_hidden_states: bool = False,
    head_mask=None,
) -> XGLMModelOutput:
    """XGLMModel's full forward, with the arguments of transformers' XGLMModel.forward.

    Exactly one of `input_ids` [B, L] and `inputs_embeds` [B, L, d_model] (already scaled, i.e.
    `embed_tokens(ids) * embed_scale`). `attention_mask` [B, S] of 1/0 covers the cached and the new
    positions (S = cache offset + L); pads are hidden from attention and, unless `position_ids` are given,
    positions are counted over real tokens only (transformers' generate() does the same; its bare forward
    counts pads too). `cache`: per-layer caches to read and extend; `use_cache` (default: the config's,
    off in training mode) makes new ones when none are given. `head_mask` [num_layers, heads] of 1/0
    multiplies each layer's attention probabilities. Dropout and layerdrop apply in training mode only.
    """
    config = self.config
    if (input_ids is None) == (inputs_embeds is None):
        raise XGLMError("pass exactly one of input_ids and inputs_embeds")
    if inputs_embeds is None:
        input_ids = _as_array(input_ids, "input_ids", 2)
        h = self.embed_tokens(input_ids) * self.embed_scale
    else:
        h = _as_array(inputs_embeds, "inputs_embeds", 3)
    B, L, _ = h.shape
    if use_cache is None:
        use_cache = config.use_cache and not self.training
    if cache is None and use_cache:
        cache = [KVCache() for _ in self.layers]
    layer_caches = cache if cache is not None else [None] * len(self.layers)
    offset = layer_caches[0].offset if layer_caches[0] is not None else 0

    attention_mask = _as_array(attention_mask, "attention_mask", 2)
    if attention_mask is not None and attention_mask.shape != (B, offset + L):
        raise XGLMError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; it must cover the cached and the new "
            f"positions: ({B}, {offset + L})"
        )
    position_ids = _as_array(position_ids, "position_ids", 2)
    if position_ids is None:
        position_ids = _positions(attention_mask, B, L, offset)
    elif position_ids.shape[1] != L or position_ids.shape[0] not in (1, B):
        raise XGLMError(f"position_ids has shape {tuple(position_ids.shape)}; it must be ({B}, {L})")
    head_mask = _as_array(head_mask, "head_mask", 2)
    if head_mask is not None and head_mask.shape != (len(self.layers), config.attention_heads):
        raise XGLMError(
            f"head_mask has shape {tuple(head_mask.shape)}; it must be "
            f"(num_layers, attention_heads) = ({len(self.layers)}, {config.attention_heads})"
        )

    # Probabilities, head_mask and attention dropout need the attention spelled out; otherwise the fused
    # kernel runs, exactly as in the decoding path.
    explicit = output_attentions or head_mask is not None or (self.training and config.attention_dropout > 0)
    if attention_mask is not None:
        mask = padding_mask(attention_mask, L, offset)
    elif explicit:
        mask = padding_mask(mx.ones((1, offset + L), mx.int32), L, offset)
    else:
        mask = "causal" if L > 1 else None
    h = h + self.embed_positions(position_ids).astype(h.dtype)
    h = dropout(h, config.dropout, self.training)

    hidden_states, attentions = [], []
    for i, (layer, layer_cache) in enumerate(zip(self.layers, layer_caches, strict=True)):
        hidden_states.append(h)
        # layerdrop (fairseq's LayerDrop): in training, skip the whole layer with this probability.
        if self.training and config.layerdrop > 0 and mx.random.uniform().item() < config.layerdrop:
            continue
        h, probs = _decoder_layer(
            layer,
            h,
            mask,
            layer_cache,
            None if head_mask is None else head_mask[i],
            explicit,
            config,
            self.training,
        )
        if output_attentions:
            attentions.append(probs)
    h = self.layer_norm(h)
    hidden_states.append(h)
    return XGLMModelOutput(
        last_hidden_state=h,
        cache=cache,
        hidden_states=tuple(hidden_states) if output_hidden_states else None,
        attentions=tuple(attentions) if output_attentions else None,
    )


def causal_lm_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    cache: list[KVCache] | None = None,
    inputs_embeds: mx.array | None = None,
    use_cache: bool | None = None,
    output_attentions: bool = False,
    output_hidden_states: bool = False,
    head_mask=None,
    labels=None,
    num_items_in_batch: int | None = None,
) -> XGLMCausalLMOutput:
    """XGLMForCausalLM's full forward, with the arguments of transformers' XGLMForCausalLM.forward.

    The arguments of `XGLMModel.forward`, plus `labels` [B, L] (token ids, -100 where no loss is wanted):
    the loss is transformers 4.56's causal-LM loss, labels shifted left by one, the mean over counted
    tokens (or the sum divided by `num_items_in_batch` when given), computed in float32. It is
    differentiable, so `nn.value_and_grad(model, lambda m, ...: m.forward(...).loss)` fine-tunes.
    """
    out = self.model.forward(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        head_mask=head_mask,
    )
    logits = self.head(out.last_hidden_state)
    loss = None
    if labels is not None:
        loss = causal_lm_loss(logits, labels, num_items_in_batch=num_items_in_batch)
    return XGLMCausalLMOutput(
        logits=logits,
        loss=loss,
        cache=out.cache,
        hidden_states=out.hidden_states,
        attentions=out.attentions,
    )
