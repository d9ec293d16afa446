"""The README.md model card of a converted folder, in the form the Hub shows for MLX models."""

from __future__ import annotations

from pathlib import Path


def _describe(config: dict) -> str:
    quantization = config.get("quantization")
    if not quantization:
        return f"weights in {config.get('torch_dtype', 'their original dtype')}"
    overrides = sum(isinstance(v, dict) for v in quantization.values())
    text = f"{quantization['bits']}-bit {quantization.get('mode', 'affine')} quantization, group size "
    text += str(quantization["group_size"])
    if overrides:
        text += f" ({overrides} modules with their own settings)"
    return text


def model_card(
    hf_path: str | Path, source: Path, repo_name: str, config: dict, adapter: str | None = None
) -> str:
    """Model card text: front matter (library mlx, base model, tags) and a usage snippet.

    `adapter` names the LoRA adapter merged into the weights (for `mlx-xglm fuse`)."""
    base = str(hf_path)
    is_repo = not Path(base).expanduser().exists()
    lines = ["---", "library_name: mlx", "license: mit", "pipeline_tag: text-generation"]
    if is_repo:
        lines.append(f"base_model: {base}")
    tags = ["- mlx", "- xglm", "- multilingual", *(["- lora"] if adapter else [])]
    lines += ["tags:", *tags, "---", "", f"# {repo_name}", ""]
    origin = f"[{base}](https://huggingface.co/{base})" if is_repo else f"`{source.name}`"
    made = "converted to MLX format"
    if adapter:
        made = f"with the LoRA adapter `{adapter}` merged into its weights, in MLX format,"
    lines += [
        f"XGLM {made} from {origin} with [mlx-xglm](https://github.com/mlx-xglm/mlx-xglm):",
        f"{_describe(config)}.",
        "",
        "## Use with mlx-xglm",
        "",
        "```bash",
        "pip install mlx-xglm",
        "```",
        "",
        "```python",
        "import mlx.core as mx",
        "from mlx_xglm import load",
        "",
        f'model, tokenizer = load("{repo_name}")',
        'logits = model(mx.array([tokenizer.encode("The dog")]))',
        "```",
        "",
    ]
    return "\n".join(lines)
