"""Reading the small JSON files that sit beside checkpoints and adapters."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import XGLMError


def read_json_object(file: Path) -> dict:
    """The JSON object in `file`; an XGLMError naming the file when it cannot be read or is not an object."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise XGLMError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise XGLMError(f"{file} must hold a JSON object")
    return value
