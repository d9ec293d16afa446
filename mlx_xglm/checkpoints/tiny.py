"""A tiny random-weight XGLM checkpoint in the Hub layout, for trying mlx-xglm offline.

The tokenizer is a sentencepiece BPE model trained on a short text in more than ten scripts
(`data/multilingual.txt`) with the ids of fairseq's models; the weights are random, drawn large so that
next-token margins are wide and greedy decoding is stable. It is the checkpoint the test suite builds
(`tests/xglm_fixtures.py`; a test checks they agree), so the examples in docs/ run on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import XGLMError
from ..outputs import save_safetensors, staged_folder
from ..tokenization.tokenizer import VOCAB_FILE, XGLMTokenizer

TEXT_FILE = Path(__file__).parent / "data" / "multilingual.txt"
SP_PIECES = 1000
# The shape of bench's "tiny" preset: sentencepiece pieces + <pad> + 7 <madeupword>s make the vocabulary.
TINY = {
    "vocab_size": SP_PIECES + 1 + 7,
    "max_position_embeddings": 64,
    "d_model": 64,
    "ffn_dim": 128,
    "num_layers": 2,
    "attention_heads": 4,
}


def train_sentencepiece(path: Path, vocab_size: int = SP_PIECES) -> Path:
    """Train the tiny tokenizer's sentencepiece model of `vocab_size` pieces into `path` (deterministic
    for a given text and size)."""
    import sentencepiece as spm

    with open(path, "wb") as out:
        spm.SentencePieceTrainer.train(
            input=str(TEXT_FILE),
            model_writer=out,
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
    return path


def random_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Hub-named float32 tensors for `config`: embedding std 1, projections scaled by 1/sqrt(fan-in)."""
    rng = np.random.default_rng(seed)
    d, f = config["d_model"], config["ffn_dim"]

    def normal(*shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], d, std=1.0)}
    weights["model.layer_norm.weight"] = 1.0 + normal(d, std=0.1)
    weights["model.layer_norm.bias"] = normal(d, std=0.1)
    for i in range(config["num_layers"]):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            weights[f"{p}self_attn.{proj}.weight"] = normal(d, d, std=d**-0.5)
            weights[f"{p}self_attn.{proj}.bias"] = normal(d, std=0.1)
        weights[f"{p}fc1.weight"] = normal(f, d, std=d**-0.5)
        weights[f"{p}fc1.bias"] = normal(f, std=0.1)
        weights[f"{p}fc2.weight"] = normal(d, f, std=f**-0.5)
        weights[f"{p}fc2.bias"] = normal(d, std=0.1)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            weights[f"{p}{norm}.weight"] = 1.0 + normal(d, std=0.1)
            weights[f"{p}{norm}.bias"] = normal(d, std=0.1)
    return weights


def write_tiny_checkpoint(path: str | Path = "tiny-xglm", seed: int = 0) -> Path:
    """Write the tiny checkpoint (2 layers, d_model 64, 4 heads, vocabulary 1008) into the new folder `path`.

    `config.json`, `model.safetensors` (float32, random weights drawn from `seed`) and the tokenizer files,
    as in a facebook/xglm-* repository; `load(path)` and every command read it. An existing `path` is
    refused. Takes about a second (most of it training the tokenizer).
    """
    target = Path(path).expanduser()
    if target.exists() or target.is_symlink():
        raise XGLMError(f"{target} already exists; pick a new folder (nothing was changed)", param="path")
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise XGLMError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}", param="seed")
    config = {
        "architectures": ["XGLMForCausalLM"],
        "model_type": "xglm",
        "activation_function": "gelu",
        "scale_embedding": True,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
        "decoder_start_token_id": 2,
        "torch_dtype": "float32",
        **TINY,
    }
    weights = {k: mx.array(v) for k, v in random_weights(config, seed).items()}
    with staged_folder(target, param="path") as work:
        XGLMTokenizer(train_sentencepiece(work / VOCAB_FILE)).save_pretrained(work)
        (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_safetensors(work / "model.safetensors", weights, metadata={"format": "pt"})
    return target
