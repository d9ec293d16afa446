"""Throughput of `mlx-xglm server` with 1, 4 and 16 concurrent clients (not part of the test suite).

Starts the server in a child process, then for each concurrency level runs that many clients at once, each
sending `--requests` greedy completions one after another. Levels alternate within each trial, so machine
noise hits them alike. Reports generated tokens per second over all clients, and the mean request time.

    python benchmarks/server_throughput.py --model ./xglm-564M
    python benchmarks/server_throughput.py --preset 564M --layers 4     # random weights, nothing downloaded

Without --model the checkpoint has random weights of a released shape and the tests' small multilingual
tokenizer (1,008 ids), so the LM head is far cheaper than a real one's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from xglm_fixtures import ServerProcess, build_checkpoint, hub_config, random_weights, train_sentencepiece  # noqa: E402

from mlx_xglm.bench import PRESETS  # noqa: E402

PROMPTS = [
    "The history of the city begins",
    "Il était une fois, dans un pays lointain,",
    "Der schnellste Weg zum Bahnhof",
    "La receta tradicional lleva",
    "東京の天気は",
    "Сегодня утром",
]


def random_checkpoint(folder: Path, preset: str, layers: int | None) -> Path:
    shape = dict(PRESETS[preset])
    if layers:
        shape["num_layers"] = layers
    config = hub_config(**shape, max_position_embeddings=2048)
    weights = random_weights(config, seed=0)
    sp = train_sentencepiece(folder / "sentencepiece.bpe.model")
    return build_checkpoint(folder / "model", sp, weights=weights, **shape, max_position_embeddings=2048)


async def client(url: str, requests: int, max_tokens: int, offset: int) -> tuple[int, list[float]]:
    tokens, times = 0, []
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for i in range(requests):
            body = {
                "prompt": PROMPTS[(offset + i) % len(PROMPTS)],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            start = time.perf_counter()
            response = await http.post("/v1/completions", json=body)
            response.raise_for_status()
            times.append(time.perf_counter() - start)
            tokens += response.json()["usage"]["completion_tokens"]
    return tokens, times


async def level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    results = await asyncio.gather(*(client(url, requests, max_tokens, c) for c in range(clients)))
    wall = time.perf_counter() - start
    tokens = sum(t for t, _ in results)
    times = [x for _, ts in results for x in ts]
    return {"tokens_per_s": tokens / wall, "mean_request_s": statistics.mean(times)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint folder to serve (default: random weights of --preset)")
    parser.add_argument("--preset", default="564M", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=4, help="layers of the random model (default: 4)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=2, help="requests per client per trial")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else random_checkpoint(Path(tmp), args.preset, args.layers)
        flags = ["--max-batch", str(args.max_batch), "--log-level", "warning"]
        server = ServerProcess(model, *flags, startup_timeout=300)
        try:
            asyncio.run(level(server.url, 1, 1, 4))  # warm-up
            runs: dict[int, list[dict]] = {c: [] for c in args.clients}
            for _ in range(args.trials):
                for clients in args.clients:
                    runs[clients].append(
                        asyncio.run(level(server.url, clients, args.requests, args.max_tokens))
                    )
        finally:
            server.stop()
    name = args.model or f"random {args.preset} ({args.layers} layers)"
    print(f"\n{name}, max_tokens {args.max_tokens}, {args.requests} requests/client, {args.trials} trials")
    print("| clients | tokens/s (median) | vs 1 client | mean request time |")
    print("|---:|---:|---:|---:|")
    base = np.median([r["tokens_per_s"] for r in runs[args.clients[0]]])
    for clients, results in runs.items():
        tps = float(np.median([r["tokens_per_s"] for r in results]))
        mean = statistics.mean(r["mean_request_s"] for r in results)
        print(f"| {clients} | {tps:.1f} | {tps / base:.2f}x | {mean:.2f} s |")
    print(json.dumps({str(c): r for c, r in runs.items()}))


if __name__ == "__main__":
    main()
