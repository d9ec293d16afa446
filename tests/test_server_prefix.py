"""The server's prefix cache and /metrics, driven by the `openai` client: same answers with and without it."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from xglm_fixtures import ServerProcess

openai = pytest.importorskip("openai")

KEY = "secret"
CONTEXT = "Le renard brun rapide saute par-dessus le chien paresseux. Où est la bibliothèque?"
ENDINGS = [" Elle est ici.", " Москва", " The end of the story", " 東京の天気は"]


@pytest.fixture(scope="module")
def cached(lively_checkpoint):
    process = ServerProcess(lively_checkpoint, "--model-id", "tiny", "--api-key", KEY, "--log-level", "debug")
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def uncached(lively_checkpoint):
    process = ServerProcess(lively_checkpoint, "--model-id", "tiny", "--prompt-cache-size", "0")
    yield process
    assert process.stop() == 0


def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def metrics(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def echo_scores(server, prompts) -> list[list[float]]:
    response = client(server).completions.create(
        model="tiny", prompt=prompts, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    return [c.logprobs.token_logprobs[1:] for c in response.choices]


def test_a_request_extending_a_finished_one_gives_the_same_text(cached, uncached, lively):
    _, tokenizer = lively
    prompt = tokenizer.encode(CONTEXT)
    # The tiny model's context is 64 tokens: 42 + 8, then those + 4 more and 8 new ones.
    first = client(cached).completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    answer = tokenizer.encode(first.choices[0].text, add_special_tokens=False)
    longer = prompt + answer + tokenizer.encode(" Москва", add_special_tokens=False)
    hits = metrics(cached)["mlx_xglm_prefix_cache_hits_total"]
    texts = [
        client(server).completions.create(model="tiny", prompt=longer, max_tokens=8, temperature=0)
        for server in (cached, uncached)
    ]
    assert texts[0].choices[0].text == texts[1].choices[0].text
    assert metrics(cached)["mlx_xglm_prefix_cache_hits_total"] == hits + 1
    assert "prefix cache hit" in cached.output()


def test_echo_log_probabilities_of_candidates_sharing_a_context_equal_uncached(cached, uncached, lively):
    _, tokenizer = lively
    prompts = [tokenizer.encode(CONTEXT + ending) for ending in ENDINGS]
    before = metrics(cached)
    with_cache = [echo_scores(cached, [p])[0] for p in prompts]
    without = [echo_scores(uncached, [p])[0] for p in prompts]
    for a, b in zip(with_cache, without, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    after = metrics(cached)
    assert after["mlx_xglm_prefix_cache_hits_total"] - before["mlx_xglm_prefix_cache_hits_total"] >= 7
    cached_tokens = (
        after["mlx_xglm_prompt_tokens_cached_total"] - before["mlx_xglm_prompt_tokens_cached_total"]
    )
    assert cached_tokens >= 3 * len(tokenizer.encode(CONTEXT)) - 12
    assert echo_scores(cached, prompts) == with_cache  # the whole prompts cached: scores given back
    assert metrics(uncached)["mlx_xglm_prefix_cache_hits_total"] == 0


def test_metrics_count_requests_and_tokens_behind_the_key(cached):
    assert httpx.get(f"{cached.url}/metrics", timeout=10).status_code == 401
    before = metrics(cached)
    response = client(cached).completions.create(model="tiny", prompt="Ciao", max_tokens=3, temperature=0)
    after = metrics(cached)
    series = 'mlx_xglm_requests_total{path="/v1/completions",status="200"}'
    assert after[series] == before.get(series, 0) + 1
    assert after["mlx_xglm_generation_tokens_total"] - before["mlx_xglm_generation_tokens_total"] == 3
    prompt_tokens = after["mlx_xglm_prompt_tokens_total"] - before["mlx_xglm_prompt_tokens_total"]
    assert prompt_tokens == response.usage.prompt_tokens
    assert after["mlx_xglm_active_rows"] == after["mlx_xglm_queued_rows"] == 0
    assert after["mlx_xglm_prefix_cache_bytes"] > 0 and after["mlx_xglm_prefix_cache_entries"] >= 1


def test_the_prefix_cache_stays_within_its_byte_bound(lively_checkpoint, lively):
    _, tokenizer = lively
    bound = 40_000  # the tiny model's cache takes 1,024 bytes per token: about 39 tokens
    server = ServerProcess(lively_checkpoint, "--model-id", "tiny", "--prompt-cache-bytes", str(bound))
    try:
        sent = client(server)
        for ending in ENDINGS:
            ids = tokenizer.encode(ending + " un deux trois quatre cinq six")
            sent.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0)
            assert 0 < metrics(server)["mlx_xglm_prefix_cache_bytes"] <= bound
        sent.completions.create(model="tiny", prompt=tokenizer.encode(CONTEXT), max_tokens=4, temperature=0)
        assert metrics(server)["mlx_xglm_prefix_cache_bytes"] <= bound
    finally:
        assert server.stop() == 0
