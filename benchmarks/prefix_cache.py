"""The server's prefix cache: first-token time of a follow-up request, and lm-eval-style echo scoring.

1. A request that extends a finished one (its prompt + completion + `--new-tokens` more, as a chat client
   resends its transcript) against an unrelated request of the same length on the same server: time to the
   first streamed token.
2. Four echo requests (echo, logprobs=1, max_tokens=1: what lm-eval's `local-completions` sends for
   multiple-choice candidates) sharing a `--context`-token context: total time on a server with the prefix
   cache and on one started with `--prompt-cache-size 0`, and the largest difference of their
   log-probabilities.

    python benchmarks/prefix_cache.py --preset 564M --layers 4      # random weights, nothing downloaded

Prompts are random token ids; each trial uses fresh ones, so nothing is cached from an earlier trial. The
random checkpoint has the tests' tokenizer (1,008 ids), so its LM head is far cheaper than a real one's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from compare import append_table  # noqa: E402
from server_throughput import random_checkpoint  # noqa: E402
from xglm_fixtures import ServerProcess  # noqa: E402

from mlx_xglm.bench import PRESETS  # noqa: E402
from mlx_xglm.serving.choices import token_text  # noqa: E402
from mlx_xglm.tokenization import XGLMTokenizer  # noqa: E402


def random_ids(rng: np.random.Generator, n: int) -> list[int]:
    """`n` ids of ordinary tokens after the document's leading </s> (ids 0-3 are special)."""
    return [2, *rng.integers(4, 1000, n - 1).tolist()]


def first_token_seconds(http: httpx.Client, prompt: list[int], max_tokens: int = 4) -> float:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                return time.perf_counter() - start
    raise RuntimeError("the stream ended without a token")


def follow_up(
    http: httpx.Client, ids: dict, rng, first: int, completion: int, new: int
) -> tuple[float, float]:
    """First-token seconds of a request extending a finished one, and of an unrelated one as long; `ids`
    maps the API's token texts back to ids."""
    prompt = random_ids(rng, first)
    body = {"prompt": prompt, "max_tokens": completion, "temperature": 0, "logprobs": 0}
    response = http.post("/v1/completions", json=body)
    response.raise_for_status()
    # The completion's token ids, as a chat client would send its transcript back.
    answer = [ids[t] for t in response.json()["choices"][0]["logprobs"]["tokens"]]
    longer = prompt + answer + random_ids(rng, new + 1)[1:]
    hit = first_token_seconds(http, longer)
    unrelated = first_token_seconds(http, random_ids(rng, len(longer)))
    return hit, unrelated


def echo_requests(http: httpx.Client, context: list[int], endings: list[list[int]]) -> tuple[float, list]:
    start = time.perf_counter()
    scores = []
    for ending in endings:
        body = {"prompt": context + ending, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
        response = http.post("/v1/completions", json=body)
        response.raise_for_status()
        scores.append(response.json()["choices"][0]["logprobs"]["token_logprobs"][1:])
    return time.perf_counter() - start, scores


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="564M", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=4, help="layers of the random model (default: 4)")
    parser.add_argument("--first", type=int, default=1500, help="prompt tokens of the first request")
    parser.add_argument("--completion", type=int, default=16, help="tokens it generates")
    parser.add_argument("--new-tokens", type=int, default=20, help="tokens the follow-up adds")
    parser.add_argument("--context", type=int, default=1000, help="shared context of the echo requests")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--output", type=Path, help="append the tables to this results file")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    hits, unrelated, cached_echo, plain_echo, gaps, sizes = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        model = random_checkpoint(Path(tmp), args.preset, args.layers)
        tokenizer = XGLMTokenizer.from_pretrained(model)
        ids = {token_text(tokenizer, i): i for i in range(len(tokenizer))}
        contexts = [random_ids(rng, args.context) for _ in range(args.trials)]
        endings = [[random_ids(rng, 12)[1:] for _ in range(4)] for _ in range(args.trials)]
        scores = {}
        for name, flags in (("cached", []), ("plain", ["--prompt-cache-size", "0"])):
            server = ServerProcess(model, "--log-level", "warning", *flags, startup_timeout=300)
            try:
                with httpx.Client(base_url=server.url, timeout=600) as http:
                    first_token_seconds(http, random_ids(rng, 64))  # warm-up
                    for trial in range(args.trials):
                        if name == "cached":
                            hit, other = follow_up(
                                http, ids, rng, args.first, args.completion, args.new_tokens
                            )
                            hits.append(hit)
                            unrelated.append(other)
                        seconds, scores[name, trial] = echo_requests(http, contexts[trial], endings[trial])
                        (cached_echo if name == "cached" else plain_echo).append(seconds)
            finally:
                server.stop()
        for trial in range(args.trials):
            for a, b in zip(scores["cached", trial], scores["plain", trial], strict=True):
                a, b = np.array(a), np.array(b)
                gap = float(np.max(np.abs(a - b)))
                gaps.append((gap, gap / float(np.max(np.abs(b)))))
                sizes.append(float(np.mean(np.abs(b))))
    load = Path("/proc/loadavg").read_text().split()[:3]
    hit, other = statistics.median(hits), statistics.median(unrelated)
    echo_cached, echo_plain = statistics.median(cached_echo), statistics.median(plain_echo)
    rows = [
        f"random {args.preset} widths, {args.layers} layers, 2,048 positions, {args.trials} trials (median); "
        f"load average {' '.join(load)}",
        "",
        "| measure | with prefix cache | without | ratio |",
        "|---|---:|---:|---:|",
        f"| first token, {args.first}+{args.completion}+{args.new_tokens}-token follow-up vs unrelated "
        f"request as long | {hit:.3f} s | {other:.3f} s | {hit / other:.2f}x |",
        f"| 4 echo requests, {args.context}-token shared context (--prompt-cache-size 0 without) "
        f"| {echo_cached:.2f} s | {echo_plain:.2f} s | {echo_cached / echo_plain:.2f}x |",
        f"| largest echo log-probability difference, absolute (relative to the largest) | "
        f"{max(g for g, _ in gaps):.1e} ({max(r for _, r in gaps):.1e}) | | |",
        f"| mean absolute echo log-probability (random weights: float32 resolution scales with it) "
        f"| {statistics.mean(sizes):.1f} | | |",
    ]
    if args.output:
        append_table(args.output, rows)
    else:
        print("\n".join(rows))
    print(
        json.dumps(
            {"hit": hits, "unrelated": unrelated, "echo_cached": cached_echo, "echo_plain": plain_echo}
        )
    )


if __name__ == "__main__":
    main()
