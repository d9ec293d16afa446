"""The full forward of XGLMModel and XGLMForCausalLM: transformers' documented options on MLX arrays.

The math lives once, in xglm.py; `model.forward(...)` checks transformers-style arguments, turns an
attention mask into the model's mask and positions, calls the model and packages what it returns: hidden
states and attention probabilities of every layer, the cache, the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..errors import XGLMError
from .cache import KVCache
from .loss import head_loss
from .masks import padding_mask, padding_positions
from .token_ids import check_token_ids


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


def _as_array(value, name: str, ndim: int) -> mx.array | None:
    if value is None:
        return None
    value = value if isinstance(value, mx.array) else mx.array(value)
    if value.ndim != ndim:
        raise XGLMError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


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
    input_ids = _as_array(input_ids, "input_ids", 2)
    inputs_embeds = _as_array(inputs_embeds, "inputs_embeds", 3)
    if input_ids is not None:
        check_token_ids(input_ids, config.vocab_size, "input_ids")
    B, L = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
    if use_cache is None:
        use_cache = config.use_cache and not self.training
    if cache is None and use_cache:
        cache = [KVCache() for _ in self.layers]
    offset = cache[0].offset if cache is not None else 0

    attention_mask = _as_array(attention_mask, "attention_mask", 2)
    if attention_mask is not None and attention_mask.shape != (B, offset + L):
        raise XGLMError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; it must cover the cached and the new "
            f"positions: ({B}, {offset + L})"
        )
    position_ids = _as_array(position_ids, "position_ids", 2)
    if position_ids is not None and (position_ids.shape[1] != L or position_ids.shape[0] not in (1, B)):
        raise XGLMError(f"position_ids has shape {tuple(position_ids.shape)}; it must be ({B}, {L})")
    head_mask = _as_array(head_mask, "head_mask", 2)
    if head_mask is not None and head_mask.shape != (len(self.layers), config.attention_heads):
        raise XGLMError(
            f"head_mask has shape {tuple(head_mask.shape)}; it must be "
            f"(num_layers, attention_heads) = ({len(self.layers)}, {config.attention_heads})"
        )
    mask = None
    if attention_mask is not None:
        mask = padding_mask(attention_mask, L, offset)
        if position_ids is None:
            position_ids = padding_positions(attention_mask, offset)

    hidden_states = [] if output_hidden_states else None
    attentions = [] if output_attentions else None
    h = self(
        input_ids,
        cache=cache,
        mask=mask,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        head_mask=head_mask,
        hidden_states=hidden_states,
        attentions=attentions,
    )
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
    h = out.last_hidden_state
    loss = None
    if labels is not None:
        # The loss reads the hidden states chunk by chunk (model/logprobs.py); `logits` stays lazy and is
        # computed only if the caller reads it.
        head_weights = self.lm_head if "lm_head" in self else self.model.embed_tokens
        loss = head_loss(
            self.head,
            h,
            labels,
            self.config.vocab_size,
            num_items_in_batch=num_items_in_batch,
            module=head_weights,
            grads=self.training,
        )
    return XGLMCausalLMOutput(
        logits=self.head(h),
        loss=loss,
        cache=out.cache,
        hidden_states=out.hidden_states,
        attentions=out.attentions,
    )
