"""Running the app on uvicorn, with a prompt stop on SIGINT and SIGTERM."""

from __future__ import annotations

import logging
import signal

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import create_app
from .engine import Engine
from .ranks import FollowerEngine, LeaderEngine

# Seconds uvicorn waits for open responses after a signal; the engine has ended their rows by then.
GRACEFUL_SECONDS = 5
# Seconds a connection has to send a request's headers (after connecting or after the last response).
HEADER_TIMEOUT = 10.0


class _HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers do not arrive in time: uvicorn
    itself waits forever for a request that is half sent (its keep-alive timer stops at the first byte)."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        cycle = self.cycle

        def expire() -> None:
            # A new cycle means the next request's headers came; a closing transport needs nothing.
            if self.cycle is cycle and not self.transport.is_closing():
                self.transport.close()

        self.loop.call_later(HEADER_TIMEOUT, expire)


class _Server(uvicorn.Server):
    """uvicorn's server that also stops the engine the moment a signal arrives: running rows end with
    finish reason "abort", so their responses close and the process exits within seconds."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        # As uvicorn's, except that the signal is not raised again after shutdown: the exit status is 0.
        self.engine.stop_soon()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def serve(
    model,
    tokenizer,
    model_id: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    log_level: str = "info",
    engine_args: dict | None = None,
    group=None,
    **app_args,
) -> None:
    """Serve `model` on `host:port` until SIGINT or SIGTERM.

    With a `group` of several processes (`mlx.launch`, the model sharded over it) this is rank 0, which
    shares each step's work with the other ranks; they run `follow` meanwhile.

    `engine_args` go to `Engine` (`max_batch`, `max_queue`, `max_kv_size`, `prefill_step_size`,
    `prompt_cache_size`, `prompt_cache_bytes`),
    `app_args` to `create_app` (`api_key`, `max_prompt_tokens`, `max_body_bytes`, `chat_template`,
    `max_model_len`, `allowed_origins`, `body_timeout`). Request headers must arrive within 10 seconds.
    `log_level` sets both uvicorn's and the per-request log lines' level.
    """
    if group is not None and group.size() > 1:
        engine = LeaderEngine(model, tokenizer, group, **(engine_args or {}))
    else:
        engine = Engine(model, tokenizer, **(engine_args or {}))
    app = create_app(engine, model_id, **app_args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=log_level.upper())
    logging.getLogger("mlx_xglm.serving").setLevel(log_level.upper())
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        http=_HeaderDeadline,
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
    )
    _Server(config, engine).run()


def follow(model, tokenizer, group, engine_args: dict | None = None) -> None:
    """On a rank other than 0 of `group`: run the work rank 0's `serve` shares until it stops."""
    FollowerEngine(model, tokenizer, group, **(engine_args or {})).run()
