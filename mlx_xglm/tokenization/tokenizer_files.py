"""The tokenizer's config files: the settings read from `tokenizer_config.json`, and the files written by
`XGLMTokenizer.save_pretrained` so that transformers' XGLMTokenizer loads them back."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import XGLMError
from ..outputs import staged_file

CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
SETTINGS = ("model_max_length", "padding_side", "truncation_side", "sp_model_kwargs")


def read_settings(config_file: Path) -> dict:
    """The XGLMTokenizer arguments stored in `config_file`, or {} when there is no such file."""
    if not config_file.is_file():
        return {}
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise XGLMError(f"{config_file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise XGLMError(f"{config_file} must hold a JSON object")
    settings = {k: config[k] for k in SETTINGS if config.get(k) is not None}
    # transformers stores "no limit" as a huge number (int(1e30)).
    if settings.get("model_max_length", 0) > 10**20:
        del settings["model_max_length"]
    return settings


def write_configs(tokenizer, folder: Path) -> list[str]:
    """Write `tokenizer_config.json` and `special_tokens_map.json` for `tokenizer`; returns their paths."""
    specials = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "unk_token": tokenizer.unk_token,
        "sep_token": tokenizer.sep_token,
        "cls_token": tokenizer.cls_token,
        "pad_token": tokenizer.pad_token,
        "additional_special_tokens": tokenizer.madeup_words,
    }
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "added_tokens_decoder": {
            str(i): {"content": token, **flags}
            for i, token in sorted(tokenizer.ids_to_special_tokens.items())
        },
        **specials,
        "clean_up_tokenization_spaces": False,
        "padding_side": tokenizer.padding_side,
        "truncation_side": tokenizer.truncation_side,
        "sp_model_kwargs": tokenizer.sp_model_kwargs,
        "tokenizer_class": "XGLMTokenizer",
    }
    if tokenizer.model_max_length is not None:
        config["model_max_length"] = tokenizer.model_max_length
    written = []
    for name, content in ((CONFIG_FILE, config), (SPECIAL_TOKENS_FILE, specials)):
        text = json.dumps(content, indent=2, ensure_ascii=False) + "\n"
        with staged_file(folder / name) as work:
            work.write_text(text, encoding="utf-8")
        written.append(str(folder / name))
    return written
