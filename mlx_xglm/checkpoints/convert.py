"""Hub or PyTorch checkpoints to MLX folders: dtype changes, quantization, dequantization, upload.

Tensors are read, converted and quantized one at a time, so memory stays near the size of the output.
The output is built in a hidden folder beside `mlx_path` and renamed into place at the end
(`mlx_xglm.outputs.staged_folder`): an error, Ctrl-C, SIGTERM or SIGHUP leaves nothing behind, and an
existing folder is never written into.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import XGLMError
from ..model.xglm import XGLMConfig
from ..outputs import save_safetensors, staged_folder
from ..tokenization.tokenizer import VOCAB_FILE
from .hub import HUB_ALLOW_PATTERNS, resolve_model_path
from .loading import DTYPES, open_checkpoint, read_tensor
from .model_card import model_card
from .quantize import module_settings, quant_settings, quantize_model

MAX_SHARD_BYTES = 5 * 1024**3
ROWS_PER_BLOCK = 8192
TOKENIZER_FILES = [VOCAB_FILE, "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"]
SOURCE_PATTERNS = [*HUB_ALLOW_PATTERNS, "tokenizer.json"]


@dataclass
class ConversionReport:
    """What `convert` produced: the folder, its weight bytes, bits per weight, seconds and peak memory."""

    path: Path
    weight_bytes: int
    bits_per_weight: float
    seconds: float
    peak_memory_gb: float


def convert(
    hf_path: str | Path,
    mlx_path: str | Path = "mlx_model",
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    q_mode: str = "affine",
    quant_predicate=None,
    dtype: str | None = None,
    dequantize: bool = False,
    upload_repo: str | None = None,
    revision: str | None = None,
    embed_bits: int | None = None,
    max_shard_size: int = MAX_SHARD_BYTES,
    verbose: bool = True,
) -> ConversionReport:
    """Convert an XGLM checkpoint (folder or Hub repo id) into an MLX folder at `mlx_path`.

    `quantize` with `q_bits` (2, 3, 4, 5, 6, 8; default 4), `q_group_size` (32, 64, 128; default 64) and
    `q_mode` ("affine", "mxfp4", "mxfp8", "nvfp4"; other modes fix their own bits and group size);
    `quant_predicate` is a recipe name ("mixed_3_6", ...) or a callable `(path, module) -> bool | dict`;
    `embed_bits` sets the bits of the embedding, which is also the LM head. `dtype` ("float16",
    "bfloat16", "float32") casts the floating-point weights (default: keep the checkpoint's).
    `dequantize` turns a quantized folder back into floats. `upload_repo` uploads the result to the Hub.
    Progress and the summary go to stderr when `verbose`. Raises XGLMError for bad input or options.
    """
    start = time.perf_counter()
    mx.reset_peak_memory()
    console = Console(stderr=True, quiet=not verbose)
    target = Path(mlx_path).expanduser()
    if target.exists() or target.is_symlink():
        raise XGLMError(
            f"mlx_path {target} already exists; pick a new folder (nothing was changed)", param="mlx_path"
        )
    _check_options(quantize, q_bits, q_group_size, q_mode, quant_predicate, dtype, dequantize, embed_bits)

    source = resolve_model_path(hf_path, revision, SOURCE_PATTERNS)
    checkpoint = open_checkpoint(source)
    config, model = checkpoint.config, checkpoint.model
    if not dequantize and "quantization" in config:
        raise XGLMError(
            f"{source} is already quantized; turn it back into floats with dequantize first",
            param="dequantize",
        )
    if dequantize and "quantization" not in config:
        raise XGLMError(f"{source} is not quantized; dequantize needs a quantized folder", param="dequantize")
    quantization = None
    if quantize:
        quantization = quantize_model(model, q_bits, q_group_size, q_mode, quant_predicate, embed_bits)
    # The output quantizes the layers quantize_model turned into quantized ones; their values are filled in
    # below from the checkpoint's tensors, one at a time.
    plan = {path: module_settings(quantization, path) for path in _quantized_paths(model)} if quantize else {}

    with staged_folder(target, param="mlx_path") as work:
        # Without a dtype a dequantized model returns to the float type it was quantized from.
        out_dtype = DTYPES.get(dtype) or (DTYPES.get(config.get("torch_dtype")) if dequantize else None)
        weights, n_params = _convert_tensors(checkpoint.tensors, config, plan, out_dtype, console)
        config = _output_config(config, weights, quantization)
        weight_bytes = save_weights(work, weights, max_shard_size)
        copy_side_files(source, work, config)
        (work / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (work / "README.md").write_text(model_card(hf_path, source, upload_repo or target.name, config))

    report = ConversionReport(
        target,
        weight_bytes,
        weight_bytes * 8 / max(n_params, 1),
        time.perf_counter() - start,
        mx.get_peak_memory() / 1e9,
    )
    console.print(
        f"Converted {source} -> {target}: {weight_bytes / 1e9:.3f} GB of weights, "
        f"{report.bits_per_weight:.3f} bits per weight, {report.seconds:.1f} s, "
        f"peak memory {report.peak_memory_gb:.3f} GB",
        soft_wrap=True,
    )
    if upload_repo:
        upload_to_hub(target, upload_repo)
        console.print(f"Uploaded {target} to https://huggingface.co/{upload_repo}")
    return report


def _check_options(quantize, q_bits, q_group_size, q_mode, quant_predicate, dtype, dequantize, embed_bits):
    """Raise XGLMError, before anything is read, unless the options agree with each other."""
    if dtype is not None and dtype not in DTYPES:
        raise XGLMError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}", param="dtype")
    if quantize and dequantize:
        raise XGLMError("dequantize cannot be combined with quantize; pick one", param="dequantize")
    if not quantize:
        given = {
            "q_bits": q_bits,
            "q_group_size": q_group_size,
            "q_mode": None if q_mode == "affine" else q_mode,
            "quant_predicate": quant_predicate,
            "embed_bits": embed_bits,
        }
        for name, value in given.items():
            if value is not None:
                raise XGLMError(
                    f"{name} only applies when quantizing; nothing is quantized without it", param=name
                )
        return
    settings = quant_settings(q_bits, q_group_size, q_mode)
    if embed_bits is not None:
        quant_settings(embed_bits, settings["group_size"], settings["mode"], bits_param="embed_bits")


def _quantized_paths(model) -> list[str]:
    names = (name for name, _ in tree_flatten(model.parameters()))
    return [name.removesuffix(".scales") for name in names if name.endswith(".scales")]


def _convert_tensors(tensors, config, plan, dtype, console) -> tuple[dict[str, mx.array], int]:
    """Output tensors and the number of weights they stand for, reading one input tensor at a time."""
    stored = config.get("quantization")
    stored_paths = {name.removesuffix(".scales") for name in tensors if name.endswith(".scales")}
    out, n_params = {}, 0
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        for name in progress.track(list(tensors), description="converting"):
            path, _, leaf = name.rpartition(".")
            if path in stored_paths and leaf in ("scales", "biases"):
                continue
            value = read_tensor(tensors.pop(name))
            if path in stored_paths and leaf == "weight":
                parts = [value] + [
                    read_tensor(tensors.pop(f"{path}.{part}"))
                    for part in ("scales", "biases")
                    if f"{path}.{part}" in tensors
                ]
                value = _by_rows(mx.dequantize, parts, module_settings(stored, path))[0]
            if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
                value = value.astype(dtype)
            n_params += value.size
            if leaf == "weight" and path in plan:
                quantized = _by_rows(mx.quantize, [value], plan[path])
                # affine returns (weight, scales, biases); the fp modes have no biases.
                parts = ("weight", "scales", "biases")[: len(quantized)]
                written = {f"{path}.{part}": q for part, q in zip(parts, quantized, strict=True)}
            else:
                written = {name: value}
            mx.eval(list(written.values()))
            out.update(written)
    return out, n_params


def _by_rows(function, arrays: list[mx.array], settings: dict) -> list[mx.array]:
    """`function(*arrays, **settings)` in blocks of rows, each evaluated before the next: groups never
    span rows, so the result is the same, and the CPU kernels' temporaries stay the size of a block
    (whole-embedding fp4 quantization needs 10-20 GB otherwise)."""
    blocks = []
    for start in range(0, arrays[0].shape[0], ROWS_PER_BLOCK):
        out = function(*(a[start : start + ROWS_PER_BLOCK] for a in arrays), **settings)
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        mx.eval(out)
        blocks.append(out)
    if len(blocks) == 1:
        return blocks[0]
    return [mx.concatenate(parts, axis=0) for parts in zip(*blocks, strict=True)]


def _output_config(config: dict, weights: dict, quantization: dict | None) -> dict:
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    embed = weights.get("model.embed_tokens.scales", weights.get("model.embed_tokens.weight"))
    if embed is not None and mx.issubdtype(embed.dtype, mx.floating):
        config["torch_dtype"] = str(embed.dtype).removeprefix("mlx.core.")
    if quantization is not None:
        config["quantization"] = quantization
    return config


def save_weights(folder: Path, weights: dict[str, mx.array], max_shard_size: int) -> int:
    """Write `model.safetensors`, or shards of at most `max_shard_size` bytes plus their index."""
    shards, current, size = [], {}, 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[name] = weights[name]
        size += nbytes
    shards.append(current)
    total = sum(v.nbytes for v in weights.values())
    if len(shards) == 1:
        save_safetensors(folder / "model.safetensors", shards[0], metadata={"format": "mlx"})
        return total
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(folder / file, shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return total


def copy_side_files(source: Path, folder: Path, config: dict) -> None:
    """Copy the tokenizer files and generation_config.json (or write one from `config`) into `folder`."""
    if not (source / VOCAB_FILE).is_file():
        raise XGLMError(f"{source / VOCAB_FILE} not found; the converted folder needs the tokenizer model")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    generation = source / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, folder / "generation_config.json")
        return
    keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    defaults = {k: config.get(k, getattr(XGLMConfig, k)) for k in keys}
    (folder / "generation_config.json").write_text(json.dumps(defaults, indent=2) + "\n")


def upload_to_hub(folder: Path, repo_id: str) -> None:
    """Create `repo_id` on the Hub if needed and upload `folder` to it."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api = HfApi()
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model")
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise XGLMError(
            f"upload_repo {repo_id}: upload failed ({e}); {folder} is kept", param="upload_repo"
        ) from None
