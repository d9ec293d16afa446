"""XGLM over several processes (`mx.distributed`): tensor parallelism and layer pipelining.

Tensor parallel (`shard`): in every layer q/k/v and fc1 map the whole hidden state to this rank's share
(heads split across ranks), out_proj and fc2 map the shares back to the whole, summed over ranks
(`mlx.nn.layers.distributed.shard_linear`, quantized layers too). The embedding is vocabulary parallel,
because at 564M-2.9B it is the largest tensor: each rank holds vocab/N rows, a lookup is summed over ranks
and the head's logits are gathered, so every rank sees the same logits and samples the same token.

Pipeline (`pipeline`): each rank holds a contiguous slice of the layers (rank N-1 the first ones, rank 0
the last, as mlx-lm's pipeline); the hidden states go from stage to stage with send/recv and the last
stage's output is broadcast, so every rank computes the same logits from its whole embedding.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from ..errors import XGLMError


def gather_vocab(x: mx.array, group) -> mx.array:
    """Each rank's logits [..., vocab/N] joined into the whole vocabulary [..., vocab], in rank order."""
    *lead, rows = x.shape
    parts = mx.distributed.all_gather(x.reshape(1, -1, rows), group=group)
    return parts.transpose(1, 0, 2).reshape(*lead, rows * group.size())


class _VocabRows:
    """This rank's rows [start, start + rows) of a table with one row per vocabulary entry."""

    group: mx.distributed.Group
    start: int
    rows: int


class _ShardedTable(_VocabRows):
    """A token embedding holding this rank's rows; lookups are summed over ranks, `as_linear` gathered."""

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids - self.start
        inside = (local >= 0) & (local < self.rows)
        h = super().__call__(mx.where(inside, local, 0))
        return mx.distributed.all_sum(mx.where(inside[..., None], h, 0), group=self.group)

    def as_linear(self, x: mx.array) -> mx.array:
        return gather_vocab(super().as_linear(x), self.group)


class _ShardedHead(_VocabRows):
    """An untied LM head holding this rank's rows; its logits are gathered over ranks."""

    def __call__(self, x: mx.array) -> mx.array:
        return gather_vocab(super().__call__(x), self.group)


class ShardedEmbedding(_ShardedTable, nn.Embedding):
    pass


class ShardedQuantizedEmbedding(_ShardedTable, nn.QuantizedEmbedding):
    pass


class ShardedHead(_ShardedHead, nn.Linear):
    pass


class ShardedQuantizedHead(_ShardedHead, nn.QuantizedLinear):
    pass


SHARDED_VOCAB = {
    nn.Embedding: ShardedEmbedding,
    nn.QuantizedEmbedding: ShardedQuantizedEmbedding,
    nn.Linear: ShardedHead,
    nn.QuantizedLinear: ShardedQuantizedHead,
}


def shard_vocab(module: nn.Module, group) -> nn.Module:
    """`module` (embedding or head, plain or quantized) keeping only this rank's vocab/N rows."""
    rows = module.weight.shape[0] // group.size()
    cls = SHARDED_VOCAB[type(module)]
    sharded = cls.__new__(cls)
    nn.Module.__init__(sharded)
    sharded.__dict__.update(vars(module))
    sharded.group, sharded.start, sharded.rows = group, group.rank() * rows, rows
    for name, value in module.items():
        if isinstance(value, mx.array):
            sharded[name] = mx.contiguous(value[sharded.start : sharded.start + rows])
    return sharded


def check_tensor_parallel(model, size: int) -> None:
    """Raise XGLMError unless `model` splits evenly over `size` ranks (heads, vocabulary, ffn_dim, and the
    quantization groups of the shares)."""
    config = model.config
    for name, n in (("attention_heads", config.attention_heads), ("vocab_size", config.vocab_size)):
        if n % size:
            raise XGLMError(
                f"{name} {n} does not split over {size} processes; use a number of processes that "
                f"divides it, or pipeline the layers instead"
            )
    if config.ffn_dim % size:
        raise XGLMError(f"ffn_dim {config.ffn_dim} does not split over {size} processes")
    for layer in model.layers:
        for linear in (layer.self_attn.out_proj, layer.fc2):
            if not isinstance(linear, nn.Linear | nn.QuantizedLinear):
                raise XGLMError(
                    f"tensor parallelism shards plain or quantized linear layers, not {type(linear).__name__}"
                    " "
                    "(a LoRA adapter?); fuse the adapter into the model first, or pipeline the layers"
                )
            group_size = getattr(linear, "group_size", None)
            if group_size and (linear_inputs(linear) // size) % group_size:
                raise XGLMError(
                    f"a quantized layer's {linear_inputs(linear)} inputs split over {size} processes are "
                    f"not whole groups of {group_size}; use fewer processes or pipeline the layers"
                )


def linear_inputs(linear: nn.Module) -> int:
    """The number of inputs of a plain or quantized linear layer."""
    if isinstance(linear, nn.QuantizedLinear):
        return linear.scales.shape[-1] * linear.group_size
    return linear.weight.shape[-1]


def shard_layer(layer, group) -> None:
    """One decoder layer's share of tensor parallelism, in place: q/k/v and fc1 all-to-sharded (heads
    split), out_proj and fc2 sharded-to-all."""
    attn = layer.self_attn
    attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
    attn.k_proj = shard_linear(attn.k_proj, "all-to-sharded", group=group)
    attn.v_proj = shard_linear(attn.v_proj, "all-to-sharded", group=group)
    attn.out_proj = shard_linear(attn.out_proj, "sharded-to-all", group=group)
    attn.num_heads //= group.size()
    layer.fc1 = shard_linear(layer.fc1, "all-to-sharded", group=group)
    layer.fc2 = shard_linear(layer.fc2, "sharded-to-all", group=group)


def shard(model, group) -> None:
    """Tensor parallelism over `group`, in place: see the module's docstring. The weights are sliced
    lazily, so a model loaded with `lazy=True` and then evaluated reads only this rank's share."""
    check_tensor_parallel(model, group.size())
    if group.size() == 1:
        return
    for layer in model.layers:
        shard_layer(layer, group)
    model.model.embed_tokens = shard_vocab(model.model.embed_tokens, group)
    if "lm_head" in model:
        model.lm_head = shard_vocab(model.lm_head, group)


class PipelineStage(nn.Module):
    """A decoder layer at an edge of this rank's slice: the first receives the hidden states from the
    stage before, the last sends its output on and takes the final stage's output, broadcast to all."""

    def __init__(self, layer: nn.Module, group, first: bool, last: bool):
        super().__init__()
        self.layer = layer
        rank, size = group.rank(), group.size()
        self.group = group
        self.receive_from = rank + 1 if first and rank < size - 1 else None
        self.send_to = rank - 1 if last and rank > 0 else None
        self.last = last

    def __call__(self, x: mx.array, mask=None, cache=None, *args) -> mx.array:
        if self.receive_from is not None:
            x = mx.distributed.recv_like(x, self.receive_from, group=self.group)
        x = self.layer(x, mask, cache, *args)
        if not self.last:
            return x
        if self.send_to is not None:
            x = mx.distributed.send(x, self.send_to, group=self.group)
            if cache is not None:
                # Evaluating the cache (as prefill does between chunks) must also send: the next stage waits.
                cache.keys = mx.depends(cache.keys, x)
        return mx.distributed.all_gather(x, group=self.group)[: x.shape[0]]


def stage(layers: int, rank: int, size: int) -> range:
    """The layers rank `rank` of `size` holds in a pipeline: about layers/size of them, the first
    `layers % size` ranks one more; rank size-1 the first layers and rank 0 the last, so that rank 0 ends
    each step with the output. Raise XGLMError when there are more ranks than layers."""
    if size > layers:
        raise XGLMError(f"cannot pipeline {layers} layers over {size} processes; use at most {layers}")
    counts = [layers // size + (r < layers % size) for r in range(size)]
    start = sum(counts[rank + 1 :])
    return range(start, start + counts[rank])


def pipeline(model, group) -> None:
    """Keep only this rank's slice of the layers (see `stage`), in place; the edges of the slice become
    PipelineStages."""
    mine = [model.model.layers[i] for i in stage(len(model.layers), group.rank(), group.size())]
    if group.size() == 1:
        return
    mine[0] = PipelineStage(mine[0], group, first=True, last=len(mine) == 1)
    if len(mine) > 1:
        mine[-1] = PipelineStage(mine[-1], group, first=False, last=True)
    model.model.layers = mine
