"""Tiny XGLM checkpoints in the exact Hub layout, built offline.

The tokenizer is a sentencepiece BPE model trained on `data/multilingual.txt` (more than ten scripts) with
the ids fairseq's sentencepiece models use (unk 0, <s> 1, </s> 2, no pad). Weights are random but drawn
large, so next-token logits have wide margins and greedy decoding is stable across implementations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import sentencepiece as spm
from safetensors.numpy import save_file

DATA = Path(__file__).parent / "data"
TEXT_FILE = DATA / "multilingual.txt"
SP_PIECES = 1000
# sentencepiece pieces + <pad> (the one fairseq special sentencepiece lacks) + 7 <madeupword>s.
VOCAB_SIZE = SP_PIECES + 1 + 7

TINY = {
    "d_model": 64,
    "ffn_dim": 128,
    "num_layers": 2,
    "attention_heads": 4,
    "max_position_embeddings": 64,
}


def train_sentencepiece(path: Path, vocab_size: int = SP_PIECES) -> Path:
    """Train the fixture tokenizer model into `path`; deterministic for a given text and size."""
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


def hub_config(**overrides) -> dict:
    """A `config.json` as transformers writes it for XGLMForCausalLM, tiny by default."""
    config = {
        "architectures": ["XGLMForCausalLM"],
        "model_type": "xglm",
        "vocab_size": VOCAB_SIZE,
        "activation_function": "gelu",
        "attention_dropout": 0.1,
        "activation_dropout": 0.0,
        "dropout": 0.1,
        "layerdrop": 0.0,
        "init_std": 0.02,
        "scale_embedding": True,
        "use_cache": True,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
        "decoder_start_token_id": 2,
        "torch_dtype": "float32",
        "transformers_version": "4.56.2",
        **TINY,
    }
    config.update(overrides)
    return config


def random_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Hub-named float32 tensors for `config`, drawn with wide logit margins in mind."""
    rng = np.random.default_rng(seed)
    d, f = config["d_model"], config["ffn_dim"]

    def normal(*shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], d, std=1.0)}
    for name, shape in [("model.layer_norm", (d,))]:
        weights[f"{name}.weight"] = 1.0 + normal(*shape, std=0.1)
        weights[f"{name}.bias"] = normal(*shape, std=0.1)
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


def write_tokenizer_files(folder: Path, sp_model: Path) -> None:
    """The tokenizer files of a facebook/xglm-* repository."""
    (folder / "sentencepiece.bpe.model").write_bytes(Path(sp_model).read_bytes())
    madeup = [f"<madeupword{i}>" for i in range(7)]
    specials = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "sep_token": "</s>",
        "cls_token": "<s>",
        "pad_token": "<pad>",
        "additional_special_tokens": madeup,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    tokenizer_config = {
        **specials,
        "model_max_length": 2048,
        "sp_model_kwargs": {},
        "tokenizer_class": "XGLMTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def build_checkpoint(
    folder: Path,
    sp_model: Path,
    seed: int = 0,
    weights: dict[str, np.ndarray] | None = None,
    **config_overrides,
) -> Path:
    """Write a complete tiny checkpoint (config, safetensors weights, tokenizer files) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = hub_config(**config_overrides)
    if weights is None:
        weights = random_weights(config, seed)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer_files(folder, sp_model)
    return folder
