"""Every error of `mlx-xglm server` is OpenAI's JSON with its status code, and the server keeps serving."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import pytest
from xglm_fixtures import ServerProcess

openai = pytest.importorskip("openai")

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    process = ServerProcess(
        tiny_checkpoint,
        "--api-key",
        KEY,
        "--max-batch",
        "1",
        "--max-queue",
        "0",
        "--max-prompt-tokens",
        "20",
        "--max-body-bytes",
        "4096",
        "--max-model-len",
        "100000",
    )
    yield process
    assert process.stop() == 0


def post(server, path: str, key: str | None = KEY, headers: dict | None = None, **kwargs) -> httpx.Response:
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    return httpx.post(f"{server.url}{path}", headers=headers, timeout=30, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def assert_still_serving(server) -> None:
    response = post(server, "/v1/completions", json={"prompt": "Bonjour", "max_tokens": 2, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("key", [None, "wrong-key", KEY + "x"])
def test_a_missing_or_wrong_api_key_gets_401(server, key):
    assert_error(post(server, "/v1/completions", key=key, json={"prompt": "x"}), 401)
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert_still_serving(server)


def test_the_openai_client_sends_the_key(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model="m", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()


def test_an_unknown_path_gets_404(server):
    assert_error(post(server, "/v1/nothing", json={}), 404)
    assert_still_serving(server)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": [5, 100000]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], "x"]}, "prompt"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"prompt": "x", "n": 0}, "n"),
    ],
)
def test_bad_parameters_get_400(server, body, param):
    assert_error(post(server, "/v1/completions", json=body), 400, param)
    assert_still_serving(server)


def test_malformed_json_gets_400(server):
    headers = {"Content-Type": "application/json"}
    error = assert_error(post(server, "/v1/completions", content=b'{"prompt": ', headers=headers), 400)
    assert "JSON" in error["message"]
    assert_error(post(server, "/v1/completions", json=["not", "an", "object"]), 400)
    assert_still_serving(server)


def test_bad_chat_messages_get_400(server):
    path = "/v1/chat/completions"
    assert_error(post(server, path, json={"messages": []}), 400, "messages")
    assert_error(post(server, path, json={"messages": [{"role": "robot", "content": "x"}]}), 400, "messages")
    assert_error(post(server, path, json={"prompt": "x"}), 400, "messages")
    assert_still_serving(server)


def test_a_body_over_the_limit_gets_413(server):
    assert_error(post(server, "/v1/completions", json={"prompt": "x" * 5000}), 413)

    def chunked():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    assert_error(post(server, "/v1/completions", content=chunked()), 413)
    assert_still_serving(server)


def test_a_prompt_over_the_limit_gets_413(server):
    assert_error(post(server, "/v1/completions", json={"prompt": list(range(4, 30))}), 413, "prompt")
    messages = [{"role": "user", "content": "Bonjour " * 30}]
    assert_error(post(server, "/v1/chat/completions", json={"messages": messages}), 413, "messages")
    assert_still_serving(server)


def test_a_full_queue_gets_503(server):
    body = {"prompt": "Bonjour", "max_tokens": 50000, "stream": True, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=30) as r:
        lines = r.iter_lines()  # held: dropping the iterator would close the stream
        assert next(line for line in lines if line.startswith("data:"))
        assert_error(post(server, "/v1/completions", json={"prompt": "x", "max_tokens": 2}), 503)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if post(server, "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200:
            break
        time.sleep(0.1)
    assert_still_serving(server)


def test_tokenize_and_detokenize(server):
    tokens = post(server, "/tokenize", json={"prompt": "Bonjour le monde"}).json()["tokens"]
    assert tokens[0] == 2
    bare = post(server, "/tokenize", json={"prompt": "Bonjour le monde", "add_special_tokens": False})
    assert bare.json()["tokens"] == tokens[1:]
    assert post(server, "/detokenize", json={"tokens": tokens[1:]}).json()["prompt"] == "Bonjour le monde"
    assert_error(post(server, "/detokenize", json={"tokens": [10**7]}), 400, "tokens")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_running_requests_and_exits_0(tiny_checkpoint, sig):
    process = ServerProcess(tiny_checkpoint, "--max-model-len", "100000")
    body = {"prompt": "Bonjour", "max_tokens": 50000, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{process.url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        process.process.send_signal(sig)
        start = time.monotonic()
        rest = [line for line in lines if line]
    assert process.process.wait(10) == 0
    assert time.monotonic() - start < 10
    assert '"finish_reason": "abort"' in "".join(rest) and rest[-1] == "data: [DONE]"


def test_a_bad_chat_template_is_one_line_naming_the_flag(tiny_checkpoint):
    command = [sys.executable, "-m", "mlx_xglm.cli", "server", "--model", str(tiny_checkpoint)]
    result = subprocess.run(
        [*command, "--chat-template", "Q: A:"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: --chat-template must contain {message} exactly once, got 'Q: A:'"
    ]
