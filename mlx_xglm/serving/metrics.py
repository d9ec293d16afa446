"""`/metrics`: the server's counters in Prometheus' text format (as vLLM and llama.cpp serve them)."""

from __future__ import annotations

import threading
from collections import Counter

# Paths counted under their own name; any other path is counted as "other", so clients cannot grow the
# number of series without bound.
COUNTED_PATHS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
    "/health",
    "/metrics",
)


class RequestCounter:
    """HTTP requests answered, by path and status; `add` is called once per request (by the gate)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, int]] = Counter()

    def add(self, path: str, status: int) -> None:
        with self._lock:
            self._counts[(path if path in COUNTED_PATHS else "other", status)] += 1

    def counts(self) -> dict[tuple[str, int], int]:
        with self._lock:
            return dict(self._counts)


def _series(lines: list[str], name: str, kind: str, help_text: str, samples) -> None:
    lines.append(f"# HELP mlx_xglm_{name} {help_text}")
    lines.append(f"# TYPE mlx_xglm_{name} {kind}")
    for labels, value in samples:
        text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"mlx_xglm_{name}{{{text}}} {value}" if text else f"mlx_xglm_{name} {value}")


def render(requests: RequestCounter, engine: dict) -> str:
    """The text of `/metrics` from the request counts and the engine's `metrics()`."""
    lines: list[str] = []
    counts = sorted(requests.counts().items())
    samples = [({"path": path, "status": status}, n) for (path, status), n in counts]
    _series(lines, "requests_total", "counter", "HTTP requests answered, by path and status.", samples)
    gauges = [
        ("active_rows", "Rows decoding now."),
        ("queued_rows", "Rows accepted and waiting for a place in the batch."),
        ("prefix_cache_bytes", "Bytes of KV arrays the prefix cache holds."),
        ("prefix_cache_entries", "Token sequences the prefix cache holds."),
    ]
    counters = [
        ("prompt_tokens_total", "Prompt tokens of generated rows and scored prompts."),
        ("prompt_tokens_cached_total", "Prompt tokens taken from the prefix cache instead of being read."),
        ("generation_tokens_total", "Tokens generated."),
        ("prefix_cache_hits_total", "Prompts that continued from the prefix cache."),
        ("prefix_cache_misses_total", "Prompts the prefix cache had no beginning of."),
    ]
    for kind, series in (("gauge", gauges), ("counter", counters)):
        for name, help_text in series:
            _series(lines, name, kind, help_text, [({}, engine[name])])
    return "\n".join(lines) + "\n"
