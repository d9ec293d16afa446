"""Hostile and careless requests: each is one clean OpenAI error before any work, the server stays
responsive and bounded, abandoned work stops, and no answer holds NaN or a traceback."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from xglm_fixtures import ServerProcess

KEY = "k3y"
ORIGIN = "http://app.example"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(lively_checkpoint):
    flags = ["--api-key", KEY, "--max-batch", "2", "--max-queue", "2", "--allowed-origins", ORIGIN]
    process = ServerProcess(
        lively_checkpoint, *flags, "--max-prompt-tokens", "40", "--max-model-len", "100000"
    )
    yield process
    assert process.stop() == 0


def post(server, path: str = "/v1/completions", headers=None, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", headers={**HEADERS, **(headers or {})}, timeout=30, **kwargs)


def raw(server, body: bytes, path: str = "/v1/completions") -> httpx.Response:
    return post(server, path, content=body, headers={"Content-Type": "application/json"})


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"] and len(error["message"]) < 500
    if param is not None:
        assert error["param"] == param
    return error


def rows(server) -> int:
    return httpx.get(f"{server.url}/health", timeout=5).json()["rows"]


def wait_for_rows(server, count: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rows(server) == count:
            return True
        time.sleep(0.05)
    return False


def test_health_answers_without_the_key_also_to_head(server):
    assert httpx.get(f"{server.url}/health", timeout=5).json()["status"] == "ok"
    assert httpx.head(f"{server.url}/health", timeout=5).status_code == 200
    assert httpx.get(f"{server.url}/v1/models", timeout=5).status_code == 401


def test_allowed_origins_get_cors_headers_and_others_do_not(server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    answer = httpx.options(f"{server.url}/v1/completions", headers=preflight, timeout=5)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(f"{server.url}/health", headers={"Origin": "http://evil.example"}, timeout=5)
    assert "access-control-allow-origin" not in other.headers


def test_a_non_streamed_request_stops_when_its_client_leaves(server):
    body = json.dumps({"prompt": "Bonjour", "max_tokens": 50000, "temperature": 0}).encode()
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
        client.sendall(request + body)
        assert wait_for_rows(server, 1)
        time.sleep(0.3)  # tokens are flowing: the check must not wait for a quiet moment
    assert wait_for_rows(server, 0, timeout=5)
    time.sleep(0.2)
    log = server.output()
    assert log.count("POST /v1/completions 499") == 1 and "Traceback" not in log


def test_a_client_leaving_a_stream_logs_no_traceback(server):
    body = {"prompt": "Bonjour", "max_tokens": 50000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=HEADERS, timeout=30) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    assert wait_for_rows(server, 0, timeout=5)
    time.sleep(0.2)
    assert "Traceback" not in server.output()


@pytest.mark.parametrize("max_tokens", [99_990, 2**64])
def test_max_tokens_past_the_context_is_400(server, max_tokens):
    response = post(server, json={"prompt": "Bonjour le monde", "max_tokens": max_tokens})
    assert assert_error(response, 400, "max_tokens")["code"] == "context_length_exceeded"
    chat = {"messages": [{"role": "user", "content": "Salut"}], "max_tokens": max_tokens}
    assert_error(post(server, "/v1/chat/completions", json=chat), 400, "max_tokens")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": [""] * 2049}, "prompt"),
        ({"prompt": [[2]] * 2049}, "prompt"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "stop": "s" * 5000}, "stop"),
        ({"prompt": "x", "stop": ["s" * 5000]}, "stop"),
        ({"prompt": [""] * 2000, "n": 16}, "n"),
        ({"prompt": "x", "logit_bias": {"²": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"9" * 5000: 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"5": 1e308}}, "logit_bias"),
        ({"prompt": "x", "repetition_penalty": 1e-300}, "repetition_penalty"),
        ({"prompt": "x", "frequency_penalty": 3}, "frequency_penalty"),
        ({"prompt": "x", "suffix": "end"}, "suffix"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
    ],
)
def test_bad_values_are_400_before_any_work(server, body, param):
    start = time.monotonic()
    assert_error(post(server, json=body), 400, param)
    assert time.monotonic() - start < 5
    assert rows(server) == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"prompt": "a\\ud800b"}', "prompt"),
        (b'{"prompt": ["ok", "\\udfff"]}', "prompt"),
        (b'{"prompt": "x", "stop": ["\\ud83d"]}', "stop"),
        (b'{"prompt": "x", "logit_bias": {"\\ud800": 1}}', "logit_bias"),
        (b'{"prompt": "x", "logit_bias": {"5": NaN}}', "logit_bias"),
        (b'{"prompt": "x", "temperature": Infinity}', "temperature"),
        (b'{"prompt": "x", "top_p": NaN}', "top_p"),
    ],
)
def test_lone_surrogates_and_non_finite_numbers_are_400(server, body, param):
    assert_error(raw(server, body), 400, param)


def test_a_lone_surrogate_in_chat_or_tokenize_is_400(server):
    chat = b'{"messages": [{"role": "user", "content": "hi \\udc00"}]}'
    assert_error(raw(server, chat, "/v1/chat/completions"), 400, "messages")
    assert_error(raw(server, b'{"prompt": "\\ud800"}', "/tokenize"), 400, "prompt")


def test_a_tiny_temperature_is_greedy(server):
    body = {"prompt": "Il était une fois", "max_tokens": 8}
    greedy = post(server, json={**body, "temperature": 0}).json()["choices"][0]["text"]
    for temperature in (1e-9, 1e-40):
        answer = post(server, json={**body, "temperature": temperature, "n": 2}).json()
        assert [c["text"] for c in answer["choices"]] == [greedy, greedy]


def test_penalties_change_a_repeating_answer(server):
    body = {"prompt": "Bonjour", "max_tokens": 16, "temperature": 0}
    plain = post(server, json=body).json()["choices"][0]["text"]
    penalised = post(server, json={**body, "presence_penalty": 2.0}).json()["choices"][0]["text"]
    assert penalised != plain


def test_logprobs_are_finite_json(server):
    body = {"prompt": "Bonjour", "max_tokens": 4, "logprobs": 5, "logit_bias": {"5": -100}, "echo": True}
    text = post(server, json=body).text
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)


def test_many_empty_prompts_keep_health_fast(server):
    start = time.monotonic()
    response = post(server, json={"prompt": [""] * 2048, "n": 16})
    assert_error(response, 400, "n")
    assert time.monotonic() - start < 2
