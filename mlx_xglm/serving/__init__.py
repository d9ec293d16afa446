"""Serving: an OpenAI-compatible HTTP server (FastAPI on uvicorn, the `[server]` extra) over one engine.

`Engine` runs the model for every request on one thread (continuous batching); `create_app` wraps it in
the app with `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/tokenize`, `/detokenize`,
`/tokenizer_info` and `/health`; `serve` runs that app until SIGINT or SIGTERM.
"""

from .app import create_app
from .engine import Engine
from .server import follow, serve

__all__ = ["Engine", "create_app", "follow", "serve"]
