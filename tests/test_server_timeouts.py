"""A half-sent request cannot hold a connection: headers and bodies have deadlines."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402
from xglm_fixtures import free_port  # noqa: E402

from mlx_xglm.serving import gate, server  # noqa: E402


async def _hello(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


def test_a_body_that_stops_arriving_gets_408():
    sent = []

    async def receive():
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": b'{"prompt": ', "more_body": True}
        await asyncio.sleep(60)

    async def send(message):
        sent.append(message)

    async def main():
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
        await asyncio.wait_for(gate.Gate(_hello, None, 1000, body_timeout=0.2)(scope, receive, send), 5)

    asyncio.run(main())
    start, body = sent[1], sent[2]
    assert start["status"] == 408
    assert json.loads(body["body"])["error"]["code"] == "body_timeout"


@pytest.fixture
def uvicorn_server(monkeypatch):
    monkeypatch.setattr(server, "HEADER_TIMEOUT", 0.5)
    port = free_port()
    config = uvicorn.Config(_hello, port=port, http=server._HeaderDeadline, log_level="error", lifespan="off")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield port
    instance.should_exit = True
    thread.join(10)


def _answer(sock: socket.socket) -> bytes:
    data = b""
    while b"hello" not in data:
        chunk = sock.recv(1024)
        if not chunk:
            break
        data += chunk
    return data


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(1024):
            pass
    except TimeoutError:
        return False
    return True


def test_half_sent_headers_are_dropped(uvicorn_server):
    with socket.create_connection(("127.0.0.1", uvicorn_server), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        assert _closed_within(sock, 5)


def test_half_sent_headers_after_a_first_request_are_dropped(uvicorn_server):
    with socket.create_connection(("127.0.0.1", uvicorn_server), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"hello" in _answer(sock)
        sock.sendall(b"GET / HTTP/1.1\r\nHo")
        assert _closed_within(sock, 5)


def test_a_whole_request_is_answered(uvicorn_server):
    with socket.create_connection(("127.0.0.1", uvicorn_server), timeout=5) as sock:
        time.sleep(0.2)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"hello" in _answer(sock)
