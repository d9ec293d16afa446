"""Fine-tuning fixtures: JSONL data folders and short training runs on the tiny checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from xglm_fixtures import TEXT_FILE

from mlx_xglm import load
from mlx_xglm.tuning import TrainingArgs, apply_lora, load_dataset, lora_config, save_adapter, train


def write_jsonl(file: Path, rows: list) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return file


def text_rows(count: int, offset: int = 0) -> list[dict]:
    """Lines of the multilingual fixture text, as {"text": ...} rows."""
    lines = [line.strip() for line in TEXT_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{"text": lines[(offset + i) % len(lines)][:200]} for i in range(count)]


def prompt_rows(count: int) -> list[dict]:
    return [
        {"prompt": f"Question {i}: what comes after {i}?", "completion": f" The answer is {i + 1}."}
        for i in range(count)
    ]


def data_folder(folder: Path, kind: str = "text", train: int = 16, valid: int = 4, test: int = 4) -> Path:
    """train/valid/test JSONL files of text rows or prompt/completion rows."""
    rows = text_rows if kind == "text" else prompt_rows
    for split, count in (("train", train), ("valid", valid), ("test", test)):
        all_rows = (
            rows(count) if kind != "text" else rows(count, offset={"train": 0, "valid": 50}.get(split, 80))
        )
        write_jsonl(folder / f"{split}.jsonl", all_rows)
    return folder


def train_adapter(checkpoint: Path, data: Path, out: Path, iters: int = 12, **options) -> Path:
    """Train a small adapter through the Python API and save it to `out`; returns `out`."""
    model, tokenizer = load(checkpoint)
    lora = {k: options.pop(k) for k in ("rank", "alpha", "target_modules", "num_layers") if k in options}
    config = lora_config(model, **lora)
    mx.random.seed(0)  # the adapter's initial lora_A
    apply_lora(model, config)
    splits = load_dataset(data, tokenizer)
    args = TrainingArgs(iters=iters, learning_rate=1e-2, steps_per_eval=iters, val_batches=1, **options)
    train(model, splits["train"], splits["valid"], args, save=lambda it: save_adapter(model, out, config))
    return out


def random_adapter(checkpoint: Path, out: Path, seed: int = 0, scale: float = 0.5) -> Path:
    """An adapter on every layer with random (non-zero) lora_B, saved to `out`: it surely changes outputs."""
    model, _ = load(checkpoint)
    config = lora_config(model)
    mx.random.seed(seed)
    apply_lora(model, config)
    for _, module in model.named_modules():
        if hasattr(module, "lora_B"):
            module.lora_B = scale * mx.random.normal(module.lora_B.shape)
    return save_adapter(model, out, config)
