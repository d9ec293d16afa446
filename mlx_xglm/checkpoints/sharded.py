"""`sharded_load`: each rank of `mlx.launch` reads only its own share of a checkpoint.

The model is built unloaded; each layer is read, sharded and evaluated in turn (tensor parallel) or only
this rank's layers are read (pipeline), and the vocabulary-sized tables are read row by row, so a rank's
peak memory is about its share of the weights. Opening and reading are agreed on (`world.agree`) and the
ranks compare a fingerprint of what they opened, so a failure or a different checkpoint on any rank stops
every rank with one message instead of a hang.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from ..errors import XGLMError
from ..model.sharding import check_tensor_parallel, shard_layer, shard_vocab, stage
from ..tokenization.tokenizer import XGLMTokenizer
from ..world import agree, check_same
from .adapters import apply_adapter
from .hub import resolve_model_path
from .loading import Checkpoint, load, open_checkpoint, read_tensor
from .slices import checkpoint_fingerprint, read_rows

VOCAB_TABLES = ("model.embed_tokens.", "lm_head.")


def sharded_load(
    path_or_repo: str | Path,
    tensor_group=None,
    pipeline_group=None,
    revision: str | None = None,
    adapter_path: str | Path | None = None,
):
    """Load an XGLM model split over the ranks of `tensor_group` (tensor parallel: heads, feed-forward
    and vocabulary split) or of `pipeline_group` (each rank a slice of the layers), and its tokenizer.

    Every rank of the group must call it with the same checkpoint; returns `(model, tokenizer)` as `load`
    does, the model ready for `generate` on every rank. `revision` and `adapter_path` are those of `load`
    (an adapter needs the pipeline: fuse it into the model for tensor parallelism). Without a group this
    is `load`. Raises on every rank when any rank fails (`world.agree`).
    """
    if tensor_group is not None and pipeline_group is not None:
        raise XGLMError("pass tensor_group or pipeline_group, not both", param="pipeline_group")
    group = tensor_group if tensor_group is not None else pipeline_group
    if group is None or group.size() == 1:
        return load(path_or_repo, revision=revision, adapter_path=adapter_path)
    tensor = tensor_group is not None

    def open_and_check() -> tuple[Checkpoint, str]:
        model_path = resolve_model_path(path_or_repo, revision)
        checkpoint = open_checkpoint(model_path)
        if tensor:
            check_tensor_parallel(checkpoint.model, group.size())
            if adapter_path is not None:
                raise XGLMError(
                    "a LoRA adapter cannot be tensor-parallel; fuse it into the model first, or pipeline",
                    param="adapter_path",
                )
        else:
            stage(len(checkpoint.model.layers), group.rank(), group.size())
        return checkpoint, checkpoint_fingerprint(model_path)

    checkpoint, fingerprint = agree(open_and_check, group)
    check_same(fingerprint, f"checkpoint files in {path_or_repo}", group)

    def read() -> XGLMTokenizer:
        if tensor:
            read_tensor_parallel(checkpoint, group)
        else:
            read_pipeline(checkpoint, group, adapter_path)
        return XGLMTokenizer.from_pretrained(checkpoint.path)

    tokenizer = agree(read, group)
    checkpoint.model.eval()
    return checkpoint.model, tokenizer


def read_tensor_parallel(checkpoint: Checkpoint, group) -> None:
    """Read, shard and evaluate one layer at a time, then this rank's rows of the vocabulary tables."""
    model, tensors = checkpoint.model, checkpoint.tensors
    outside = ("model.layers.", *VOCAB_TABLES)
    rest = [(n, read_tensor(t)) for n, t in tensors.items() if not n.startswith(outside)]
    model.load_weights(rest, strict=False)
    # Not model.parameters(): the layers and tables not read yet hold random initial values.
    mx.eval([value for _, value in rest])
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        layer.load_weights(
            [(n[len(prefix) :], read_tensor(t)) for n, t in tensors.items() if n.startswith(prefix)]
        )
        shard_layer(layer, group)
        mx.eval(layer.parameters())
    for prefix in VOCAB_TABLES:
        owner, name = (model.model, "embed_tokens") if prefix.startswith("model.") else (model, "lm_head")
        if name not in owner:
            continue
        table = shard_vocab(owner[name], group)
        for key, value in list(table.items()):
            if isinstance(value, mx.array):
                table[key] = read_rows(checkpoint, prefix + key, table.start, table.start + table.rows)
                mx.eval(table[key])
        setattr(owner, name, table)


def read_pipeline(checkpoint: Checkpoint, group, adapter_path) -> None:
    """Read the tensors outside the layers and those of this rank's layers; keep only those layers."""
    model = checkpoint.model
    mine = tuple(f"model.layers.{i}." for i in stage(len(model.layers), group.rank(), group.size()))
    wanted = [
        (n, read_tensor(t))
        for n, t in checkpoint.tensors.items()
        if not n.startswith("model.layers.") or n.startswith(mine)
    ]
    model.load_weights(wanted, strict=False)
    if adapter_path is not None:
        apply_adapter(model, adapter_path)
    model.pipeline(group)
    mx.eval(model.parameters())
