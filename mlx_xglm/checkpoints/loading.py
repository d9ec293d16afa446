"""From a folder or Hub repo id to a ready model: files -> weights dict -> sanitize -> XGLMForCausalLM."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import XGLMError
from ..model.xglm import XGLMConfig, XGLMForCausalLM
from ..tokenization.tokenizer import XGLMTokenizer
from .adapters import apply_adapter
from .hub import resolve_model_path
from .json_files import read_json_object
from .quantize import apply_quantization
from .torch_bin import TorchTensor, read_torch_bin

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def load_config(model_path: Path) -> dict:
    """The checkpoint's `config.json` as a dict, checked to describe an XGLM model."""
    config_file = model_path / "config.json"
    if not config_file.is_file():
        raise XGLMError(f"{config_file} not found; an XGLM checkpoint folder needs its config.json")
    config = read_json_object(config_file)
    model_type = config.get("model_type")
    if model_type != "xglm":
        raise XGLMError(
            f"{config_file} describes model_type {model_type!r}; mlx-xglm loads only 'xglm' checkpoints"
        )
    return config


def weight_files(model_path: Path) -> list[Path]:
    """The weight files of a checkpoint: safetensors (following `model.safetensors.index.json` when
    present), else `pytorch_model.bin`."""
    index_file = model_path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise XGLMError(f"{index_file} is not a valid safetensors index: {e}") from None
        files = [model_path / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise XGLMError(f"{file} is listed in {index_file.name} but missing")
        return files
    files = sorted(model_path.glob("*.safetensors"))
    if not files and (model_path / "pytorch_model.bin").is_file():
        files = [model_path / "pytorch_model.bin"]
    if not files:
        raise XGLMError(f"no weights in {model_path}: expected model.safetensors or pytorch_model.bin")
    return files


def read_weights(model_path: Path) -> dict[str, mx.array | TorchTensor]:
    """All tensors of the checkpoint, none read yet: lazy mx.arrays, or TorchTensors for `.bin` files."""
    weights = {}
    for file in weight_files(model_path):
        if file.suffix == ".bin":
            weights.update(read_torch_bin(file))
            continue
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError, OSError) as e:
            raise XGLMError(f"{file} is not a readable safetensors file ({e})") from None
    return weights


def head_is_untied(config: dict, weights: dict) -> bool:
    """True when the checkpoint stores an `lm_head.weight` that is not a copy of the token embedding."""
    head, embed = weights.get("lm_head.weight"), weights.get("model.embed_tokens.weight")
    if head is None or embed is None or not config.get("tie_word_embeddings", True):
        return False
    if isinstance(head, TorchTensor) and head == embed:
        return False  # torch saved the tied parameter once: same storage, same view
    head, embed = read_tensor(head), read_tensor(embed)
    return head.shape != embed.shape or not mx.array_equal(head, embed).item()


def check_weights(model: nn.Module, weights: dict[str, mx.array], source: Path) -> None:
    """Raise XGLMError naming the first missing, unexpected or mis-shaped tensor."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise XGLMError(f"{source}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise XGLMError(f"{source}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all)")
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise XGLMError(
                f"{source}: tensor {name} has shape {tuple(value.shape)}, config.json implies "
                f"{tuple(expected[name].shape)}"
            )


@dataclass
class Checkpoint:
    """A checkpoint folder, checked but not read: what `load` and `convert` both start from.

    `config` is its config.json (with `tie_word_embeddings` false when the head is untied); `model` the
    XGLMForCausalLM it describes, its layers quantized where the checkpoint stores them quantized, its
    weights not loaded; `tensors` maps each of the model's parameter names to a tensor not read yet.
    """

    path: Path
    config: dict
    model: XGLMForCausalLM
    tensors: dict[str, mx.array | TorchTensor]


def open_checkpoint(model_path: Path) -> Checkpoint:
    """Read config.json, find every tensor and check it against the model the config describes.

    Nothing is read from the weight files beyond their headers (except to compare an `lm_head.weight`
    with the embedding); an untied head is kept with a warning. Raises XGLMError naming the file or tensor.
    """
    config = load_config(model_path)
    tensors = read_weights(model_path)
    if head_is_untied(config, tensors):
        warnings.warn(
            f"{model_path}: lm_head.weight differs from the token embedding; using it as an untied head",
            stacklevel=3,
        )
        config = {**config, "tie_word_embeddings": False}
    model = XGLMForCausalLM(XGLMConfig.from_dict(config, source=model_path / "config.json"))
    tensors = model.sanitize(tensors)
    if "quantization" in config:
        apply_quantization(model, config["quantization"], set(tensors))
    check_weights(model, tensors, model_path)
    return Checkpoint(model_path, config, model, tensors)


def read_tensor(tensor: mx.array | TorchTensor) -> mx.array:
    """An mx.array of a checkpoint tensor: a safetensors array stays lazy, a `.bin` tensor is read."""
    return tensor.load() if isinstance(tensor, TorchTensor) else tensor


def load_model(
    model_path: Path, lazy: bool = False, adapter_path: str | Path | None = None
) -> XGLMForCausalLM:
    """Build XGLMForCausalLM from a checkpoint folder; with `lazy`, safetensors weights load on first use;
    with `adapter_path`, a PEFT LoRA adapter is applied right after the weights."""
    checkpoint = open_checkpoint(model_path)
    model = checkpoint.model
    model.load_weights([(name, read_tensor(tensor)) for name, tensor in checkpoint.tensors.items()])
    if adapter_path is not None:
        apply_adapter(model, adapter_path)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model


def load(
    path_or_repo: str | Path,
    revision: str | None = None,
    lazy: bool = False,
    adapter_path: str | Path | None = None,
) -> tuple[XGLMForCausalLM, XGLMTokenizer]:
    """Load an XGLM model and its tokenizer.

    `path_or_repo` is a local checkpoint folder or a Hub repo id such as "facebook/xglm-564M";
    `revision` picks a Hub branch, tag or PR ref; with `lazy` the weights are read from disk on first use.
    `adapter_path` (a folder or Hub repo id with a PEFT LoRA adapter, ours or peft's) wraps the adapted
    layers in LoRALinear right after the weights are loaded.
    Raises XGLMError, naming the file or tensor, for anything wrong with the checkpoint or adapter.
    """
    model_path = resolve_model_path(path_or_repo, revision)
    model = load_model(model_path, lazy=lazy, adapter_path=adapter_path)
    tokenizer = XGLMTokenizer.from_pretrained(model_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise XGLMError(
            f"{model_path / 'config.json'} says vocab_size {model.config.vocab_size}, but the tokenizer "
            f"has {tokenizer.vocab_size} tokens: its ids past the embedding table cannot be read; "
            "fix vocab_size or use the checkpoint's own tokenizer files",
            param="vocab_size",
        )
    return model, tokenizer
