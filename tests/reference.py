"""Running transformers 4.56 (the reference) on the same fixtures, as numpy arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def reference_model(path: Path):
    import transformers

    return transformers.XGLMForCausalLM.from_pretrained(path, torch_dtype="float32").eval()


def reference_tokenizer(path: Path):
    import transformers

    return transformers.XGLMTokenizer.from_pretrained(path)


def reference_logits(model, ids: list[list[int]], **kwargs) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids), **kwargs).logits.float().numpy()


def reference_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, min_length=0
        )
    return out[0].tolist()[len(ids) :]
