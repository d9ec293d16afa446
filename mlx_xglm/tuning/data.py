"""Fine-tuning data: JSONL rows to token ids and labels, and padded batches.

A data folder holds `train.jsonl`, `valid.jsonl` and optionally `test.jsonl`, one JSON object a line:
`{"text": ...}`, or `{"prompt": ..., "completion": ...}` (mlx-lm's formats). A text row reads as XGLM reads
a document, `</s> text </s>`; a prompt row as `</s> prompt completion </s>`, the two parts tokenized apart
so the prompt's tokens are exactly those a later generation reads. With `mask_prompt` only the completion
and the closing `</s>` count in the loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import XGLMError
from ..model.loss import IGNORE_INDEX

SPLITS = ("train", "valid", "test")


@dataclass
class Example:
    """One row: its token ids and how many leading ids are prompt (no loss with `mask_prompt`)."""

    ids: list[int]
    prompt_length: int


def read_jsonl(file: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a malformed line is an XGLMError naming it."""
    rows = []
    try:
        # JSON Lines end at "\n" only: str.splitlines also splits at U+2028 and others, inside strings.
        lines = file.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise XGLMError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise XGLMError(f"cannot read {file}: {e.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise XGLMError(f"{file}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise XGLMError(f"{file}:{number}: a row must be a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def encode_row(row: dict, where: str, tokenizer, mask_prompt: bool, newlines: str = "space") -> Example:
    """Token ids of one row, ending with `</s>`; `where` ("file:line") names it in errors."""
    eos = tokenizer.eos_token_id
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        prompt = tokenizer.encode(row["prompt"], newlines=newlines)
        completion = tokenizer.encode(row["completion"], add_special_tokens=False, newlines=newlines)
        return Example(prompt + completion + [eos], len(prompt))
    if isinstance(row.get("text"), str):
        if mask_prompt:
            raise XGLMError(
                f'{where}: mask_prompt needs {{"prompt": ..., "completion": ...}} rows; this one is "text"',
                param="mask_prompt",
            )
        return Example(tokenizer.encode(row["text"], newlines=newlines) + [eos], 0)
    raise XGLMError(
        f'{where}: a row needs a string "text", or string "prompt" and "completion"; it has '
        f"{', '.join(sorted(row)) or 'no keys'}"
    )


def load_split(
    file: Path, tokenizer, mask_prompt: bool = False, max_seq_length: int = 2048, newlines: str = "space"
) -> list[Example]:
    """The examples of one JSONL file, truncated to `max_seq_length` tokens.

    A row that would have nothing left to learn (its prompt fills `max_seq_length`) is an XGLMError.
    """
    examples = []
    for number, row in read_jsonl(file):
        example = encode_row(row, f"{file}:{number}", tokenizer, mask_prompt, newlines)
        example.ids = example.ids[:max_seq_length]
        counted = len(example.ids) - (example.prompt_length if mask_prompt else 1)
        if counted < 1:
            raise XGLMError(
                f"{file}:{number}: nothing left to learn after truncating to {max_seq_length} tokens; "
                "raise max_seq_length or shorten the prompt",
                param="max_seq_length",
            )
        examples.append(example)
    return examples


def load_dataset(
    data: str | Path,
    tokenizer,
    splits: tuple[str, ...] = ("train", "valid"),
    mask_prompt: bool = False,
    max_seq_length: int = 2048,
    newlines: str = "space",
) -> dict[str, list[Example]]:
    """The named splits of a data folder (`{split}.jsonl`), each required to exist and hold rows."""
    folder = Path(data).expanduser()
    if not folder.is_dir():
        raise XGLMError(f"data folder {folder} does not exist; it should hold train.jsonl and valid.jsonl")
    if max_seq_length < 2:
        raise XGLMError(f"max_seq_length must be 2 or more, got {max_seq_length}", param="max_seq_length")
    out = {}
    for split in splits:
        file = folder / f"{split}.jsonl"
        if not file.is_file():
            raise XGLMError(f"{file} not found; the {split} split needs a {split}.jsonl in {folder}")
        out[split] = load_split(file, tokenizer, mask_prompt, max_seq_length, newlines)
        if not out[split]:
            raise XGLMError(f"{file} holds no rows; the {split} split needs at least one")
    return out


def make_batch(examples: list[Example], mask_prompt: bool, pad_id: int = 1) -> tuple[mx.array, mx.array]:
    """(input ids, labels), right-padded to the longest row; labels are -100 on pads (and on prompts
    with `mask_prompt`), so the model's causal-LM loss skips them. Right padding keeps every real token's
    positions and attention as in an unpadded row."""
    width = max(len(e.ids) for e in examples)
    ids = np.full((len(examples), width), pad_id, np.int32)
    labels = np.full((len(examples), width), IGNORE_INDEX, np.int32)
    for row, example in enumerate(examples):
        ids[row, : len(example.ids)] = example.ids
        labels[row, : len(example.ids)] = example.ids
        if mask_prompt:
            labels[row, : example.prompt_length] = IGNORE_INDEX
    return mx.array(ids), mx.array(labels)


def iterate_batches(
    examples: list[Example],
    batch_size: int,
    mask_prompt: bool = False,
    loop: bool = False,
    rng: np.random.Generator | None = None,
):
    """Yield (ids, labels) batches of rows of similar length, in a shuffled order when `rng` is given;
    forever with `loop`. The last batch of a pass may be smaller."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    while True:
        sequence = rng.permutation(len(batches)) if rng is not None else range(len(batches))
        for b in sequence:
            yield make_batch([examples[i] for i in batches[b]], mask_prompt)
        if not loop:
            return
