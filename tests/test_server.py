"""`mlx-xglm server` driven by the official `openai` client: completions, streaming, echo, chat, batching."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
from reference import reference_logits, reference_model
from xglm_fixtures import ServerProcess

from mlx_xglm import generate
from mlx_xglm.tokenization.prompt import chat_prompt_ids

openai = pytest.importorskip("openai")

PROMPTS = [
    "Bonjour le monde",
    "The cat sat on",
    "Der Hund",
    "Hola, ¿cómo",
    "日本語の",
    "Привет",
    "Ciao",
    "Olá",
]


@pytest.fixture(scope="module")
def server(lively_checkpoint):
    process = ServerProcess(lively_checkpoint, "--model-id", "tiny", "--max-model-len", "100000")
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def greedy(model_and_tokenizer, prompt, max_tokens, **kwargs) -> str:
    model, tokenizer = model_and_tokenizer
    return generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_greedy_completion_equals_generate(client, lively, prompt):
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert choice.text == greedy(lively, prompt, 12)
    assert choice.finish_reason == "length"
    _, tokenizer = lively
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert response.usage.completion_tokens == 12


def test_streamed_chunks_concatenate_to_the_completion(client, lively):
    stream = client.completions.create(
        model="tiny",
        prompt=PROMPTS[0],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy(lively, PROMPTS[0], 10)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_stop_string_ends_the_text_before_it(client, lively):
    full = greedy(lively, PROMPTS[1], 12)
    stop = full[len(full) // 2 :][:2]
    response = client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=stop
    )
    assert response.choices[0].text == full[: full.index(stop)]
    assert response.choices[0].finish_reason == "stop"


@pytest.mark.reference
def test_echo_logprobs_equal_transformers(client, lively, lively_checkpoint):
    _, tokenizer = lively
    prompt = "Bonjour le monde, comment allez-vous"
    response = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=3, temperature=0
    )
    logprobs = response.choices[0].logprobs
    ids = tokenizer.encode(prompt)
    logits = reference_logits(reference_model(lively_checkpoint), [ids])[0].astype(np.float64)
    peak = logits.max(-1, keepdims=True)
    expected = logits - peak - np.log(np.exp(logits - peak).sum(-1, keepdims=True))
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert len(logprobs.tokens) == len(ids)
    got = np.array(logprobs.token_logprobs[1:])
    want = expected[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(got, want, atol=1e-4)
    best = expected[0].argsort()[::-1][:3]
    top = logprobs.top_logprobs[1]
    for token in best:
        text = tokenizer.convert_id_to_token(int(token)).replace("\u2581", " ")
        assert abs(top[text] - expected[0, token]) < 1e-4
    assert response.choices[0].text.startswith("Bonjour le monde")


def test_echo_puts_the_prompt_before_the_answer(client, lively):
    prompt = PROMPTS[2]
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, echo=True, temperature=0)
    answer = greedy(lively, prompt, 6)
    assert response.choices[0].text.replace(" ", "") == (prompt + answer).replace(" ", "")
    assert response.choices[0].text.startswith(prompt)


def test_token_id_prompt_is_used_as_given(client, lively):
    _, tokenizer = lively
    ids = tokenizer.encode(PROMPTS[0])
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    by_text = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)  # no second </s>
    without_eos = client.completions.create(model="tiny", prompt=ids[1:], max_tokens=8, temperature=0)
    assert without_eos.usage.prompt_tokens == len(ids) - 1
    assert without_eos.choices[0].text == greedy(lively, ids[1:], 8)


def test_several_prompts_give_one_choice_each_in_order(client, lively):
    _, tokenizer = lively
    prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    response = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.text for c in response.choices] == [greedy(lively, p, 6) for p in PROMPTS[:3]]


def test_seeded_sampling_repeats(client):
    def sample():
        response = client.completions.create(
            model="tiny", prompt=PROMPTS[3], max_tokens=10, temperature=1.0, seed=7, n=2
        )
        return [c.text for c in response.choices]

    first = sample()
    assert sample() == first


def test_chat_answers_the_conversation_transcript(client, lively):
    model, tokenizer = lively
    messages = [
        {"role": "user", "content": "Bonjour"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "Ça va ?"},
    ]
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    ids = chat_prompt_ids(tokenizer, [(m["role"], m["content"]) for m in messages])
    expected = generate(model, tokenizer, ids, max_tokens=10, stop=["User:"])
    assert response.choices[0].message.content == expected
    assert response.choices[0].message.role == "assistant"
    assert response.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_concurrent_requests_equal_their_sequential_answers(server, client):
    lengths = [5, 9, 13, 7, 11, 6, 10, 8]
    alone = [
        client.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0).choices[0].text
        for p, n in zip(PROMPTS, lengths, strict=True)
    ]

    async def together():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused") as aclient:
            calls = [
                aclient.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0)
                for p, n in zip(PROMPTS, lengths, strict=True)
            ]
            return [r.choices[0].text for r in await asyncio.gather(*calls)]

    assert asyncio.run(together()) == alone


def test_a_seeded_request_samples_the_same_beside_other_requests(server, client):
    seeded = {"model": "tiny", "prompt": PROMPTS[3], "max_tokens": 10, "temperature": 1.0, "seed": 3}
    alone = client.completions.create(**seeded).choices[0].text

    async def beside_others():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused") as aclient:
            others = [
                aclient.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=1.0)
                for p in PROMPTS[:3]
            ]
            results = await asyncio.gather(aclient.completions.create(**seeded), *others)
            return results[0].choices[0].text

    assert asyncio.run(beside_others()) == alone


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    body = {"prompt": PROMPTS[0], "max_tokens": 50000, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert httpx.get(f"{server.url}/health").json()["rows"] == 1
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/health").json()["rows"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{server.url}/health").json()["rows"] == 0


def test_every_request_gets_a_log_line(server, client):
    client.completions.create(model="tiny", prompt="Ciao", max_tokens=3, temperature=0)
    time.sleep(0.2)
    assert "POST /v1/completions 200 prompt=" in server.output()
