"""Checking an XGLMConfig's fields: what each must hold to describe a model that can be built and run.

`XGLMConfig.__post_init__` calls `config_problem` once, so every way of making a config (a checkpoint's
`config.json`, code, bench presets) is checked the same way.
"""

from __future__ import annotations

import math


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_token_id(value) -> bool:
    if isinstance(value, list):
        return all(_is_token_id(v) for v in value)
    return value is None or (_is_int(value) and value >= 0)


def config_problem(config, activations, position_offset: int) -> tuple[str, str] | None:
    """The first field of an XGLMConfig that cannot describe an XGLM model, and what is wrong with it.

    `activations` are the supported activation names; `position_offset` the rows the position table
    reserves before the first token (the padding row `pad_token_id` must fall inside the table).
    """
    sizes = ("vocab_size", "max_position_embeddings", "d_model", "ffn_dim", "num_layers", "attention_heads")
    for name in sizes:
        value = getattr(config, name)
        if not _is_int(value) or value < 1:
            return name, "must be a positive integer"
    if config.d_model % config.attention_heads:
        return "d_model", f"must be divisible by attention_heads ({config.attention_heads})"
    if config.d_model < 4:
        return "d_model", "must be at least 4 (the sinusoid divides by d_model / 2 - 1)"
    if config.activation_function not in activations:
        return "activation_function", f"must be one of {', '.join(activations)}"
    for name in ("dropout", "attention_dropout", "activation_dropout", "layerdrop"):
        value = getattr(config, name)
        if not _is_number(value) or not 0 <= value <= 1:
            return name, "must be a number from 0 to 1"
    if not _is_number(config.init_std) or config.init_std < 0:
        return "init_std", "must be a number of 0 or more"
    for name in ("scale_embedding", "use_cache", "tie_word_embeddings"):
        if not isinstance(getattr(config, name), bool):
            return name, "must be true or false"
    # pad_token_id is also the zero row of the position table.
    pad = config.pad_token_id
    if not _is_int(pad) or not 0 <= pad < config.max_position_embeddings + position_offset:
        return "pad_token_id", "must be an integer from 0 to max_position_embeddings + 1"
    for name in ("bos_token_id", "eos_token_id", "decoder_start_token_id"):
        if not _is_token_id(getattr(config, name)):
            return name, "must be a token id (an integer of 0 or more)"
    return None
