"""Merging a LoRA adapter into its base model, written as a plain checkpoint folder.

The merged weight of each adapted layer is `W + scaling * lora_B @ lora_A`, exactly as peft's
`merge_and_unload` makes it. A quantized base is dequantized, merged and quantized again with its own
settings, so the adapter is never dropped; `dequantize` writes every weight in floating point instead,
which transformers' `XGLMForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..checkpoints.convert import MAX_SHARD_BYTES, copy_side_files, save_weights, upload_to_hub
from ..checkpoints.hub import resolve_model_path
from ..checkpoints.loading import load_config, load_model
from ..checkpoints.model_card import model_card
from ..errors import XGLMError
from ..model.lora import LoRALinear, dequantized_weight
from ..outputs import staged_folder


def fuse_adapters(model: nn.Module, dequantize: bool = False) -> int:
    """Replace every LoRALinear in `model` by its merged layer, in place; returns how many were merged."""
    merged = [(path, m.fused(dequantize)) for path, m in model.named_modules() if isinstance(m, LoRALinear)]
    if merged:
        model.update_modules(tree_unflatten(merged))
    return len(merged)


def fuse(
    model: str | Path,
    adapter_path: str | Path,
    save_path: str | Path = "fused_model",
    dequantize: bool = False,
    upload_repo: str | None = None,
    revision: str | None = None,
) -> Path:
    """Merge the LoRA adapter at `adapter_path` into `model` and write the result to `save_path`.

    `model` is a checkpoint folder or Hub repo id (`revision` for the Hub), `adapter_path` a PEFT LoRA
    adapter folder or repo id. The folder gets our layout (config.json, safetensors, tokenizer files,
    a model card naming base model and adapter); it is built beside `save_path` and renamed into place at
    the end, and an existing `save_path` is refused. `dequantize` writes a quantized base in floating
    point. `upload_repo` uploads the folder to the Hub. Returns the folder.
    """
    target = Path(save_path).expanduser()
    if target.exists() or target.is_symlink():
        raise XGLMError(f"save_path {target} already exists; pick a new folder", param="save_path")
    source = resolve_model_path(model, revision)
    config = load_config(source)
    if dequantize and "quantization" not in config:
        raise XGLMError(f"{source} is not quantized; dequantize needs a quantized model", param="dequantize")
    base = load_model(source, adapter_path=adapter_path)
    fuse_adapters(base, dequantize)
    if dequantize:
        _dequantize_modules(base, config.get("torch_dtype"))
        config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    weights = dict(tree_flatten(base.parameters()))
    embed = weights["model.embed_tokens.weight"]
    if mx.issubdtype(embed.dtype, mx.floating):
        config["torch_dtype"] = str(embed.dtype).removeprefix("mlx.core.")
    config["tie_word_embeddings"] = base.config.tie_word_embeddings

    with staged_folder(target, param="save_path") as work:
        _fill(work, weights, config, source, model, adapter_path, target)
    if upload_repo:
        upload_to_hub(target, upload_repo)
    return target


def _dequantize_modules(model: nn.Module, dtype: str | None) -> None:
    """Replace every quantized Linear and Embedding by its floating-point form (in `dtype` when given)."""
    dtype = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}.get(dtype)
    floats = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        weight = dequantized_weight(module)
        weight = weight.astype(dtype) if dtype is not None else weight
        if isinstance(module, nn.QuantizedEmbedding):
            layer = nn.Embedding(*weight.shape)
        else:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
            if "bias" in module:
                layer.bias = module.bias
        layer.weight = weight
        floats.append((path, layer))
    model.update_modules(tree_unflatten(floats))


def _fill(work: Path, weights, config: dict, source: Path, model, adapter_path, target: Path) -> None:
    save_weights(work, weights, MAX_SHARD_BYTES)
    copy_side_files(source, work, config)
    (work / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    card = model_card(model, source, target.name, config, adapter=str(adapter_path))
    (work / "README.md").write_text(card)
