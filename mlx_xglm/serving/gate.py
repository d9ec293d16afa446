"""What every request passes before an endpoint sees it: the body limit, the API key, and the log line."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from .errors import error_body

log = logging.getLogger("mlx_xglm.serving")

# Seconds a client has to send its whole body; a half-sent request must not hold a connection forever.
DEFAULT_BODY_TIMEOUT = 30.0
# Paths anyone may ask, without the API key (load balancers and orchestrators probe them).
OPEN_PATHS = {"/health"}


async def _send_error(send, status: int, message: str, code: str | None = None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """ASGI middleware: 413 for a body over `max_body_bytes`, 401 without `Authorization: Bearer
    <api_key>` (compared in constant time) when a key is set, and one log line per request: method, path,
    status, prompt and generated tokens, tokens per second and time taken. A body that has not fully
    arrived after `body_timeout` seconds gets a 408. `/health` needs no key. `requests` (a
    RequestCounter) counts each answered request for /metrics."""

    def __init__(
        self,
        app,
        api_key: str | None,
        max_body_bytes: int,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        requests=None,
    ):
        self.app = app
        self.requests = requests
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def _read_body(self, receive) -> tuple[bytes | None, list[dict]]:
        """The whole body (None when over the limit) and the messages it came in, to replay them.
        TimeoutError when it does not arrive within `body_timeout` seconds."""
        messages, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError
            message = await asyncio.wait_for(receive(), left)
            messages.append(message)
            if message["type"] != "http.request":
                return b"", messages
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return None, messages
            if not message.get("more_body", False):
                return b"", messages

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        state = scope.setdefault("state", {})
        if scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            return await _send_error(send, 401, "a valid API key is needed: Authorization: Bearer KEY")
        too_big = f"the request body is over this server's limit of {self.max_body_bytes} bytes"
        if int(headers.get(b"content-length", b"0") or 0) > self.max_body_bytes:
            return await _send_error(send, 413, too_big, "body_too_large")
        try:
            body, messages = await self._read_body(receive)
        except TimeoutError:
            message = f"the request body did not arrive within {self.body_timeout:g} seconds"
            return await _send_error(send, 408, message, "body_timeout")
        if body is None:
            return await _send_error(send, 413, too_big, "body_too_large")

        async def replay():
            return messages.pop(0) if messages else await receive()

        start = time.perf_counter()
        status = [499]  # nginx's "client closed the request", if no status ever goes out
        logged = [False]

        def log_line() -> None:
            logged[0] = True
            if self.requests is not None:
                self.requests.add(scope["path"], status[0])
            elapsed = time.perf_counter() - start
            prompt, generated = state.get("prompt_tokens", 0), state.get("generated_tokens", 0)
            log.info(
                "%s %s %d prompt=%d generated=%d %.1f tokens/s %.2fs",
                scope["method"],
                scope["path"],
                status[0],
                prompt,
                generated,
                generated / elapsed if elapsed > 0 else 0.0,
                elapsed,
            )

        async def send_and_log(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log_line()

        try:
            await self.app(scope, replay, send_and_log)
        finally:
            if not logged[0]:
                log_line()
