"""`mlx-xglm bench` and mlx_xglm.bench: what they report, not how fast (timings are never asserted)."""

import json
import subprocess
import sys

import mlx.nn as nn
import pytest

from mlx_xglm import XGLMError, load
from mlx_xglm.bench import PRESETS, benchmark, random_model, weight_bytes


def bench(*args):
    return subprocess.run(
        [sys.executable, "-m", "mlx_xglm.cli", "bench", *args], capture_output=True, text=True
    )


def test_json_report_on_the_last_line(tiny_checkpoint):
    result = bench(
        "--model",
        str(tiny_checkpoint),
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--trials",
        "2",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("prompt_tps", "generation_tps", "ttft", "peak_memory", "ceiling_tps", "ceiling_fraction"):
        assert report[key] > 0, key
    assert report["model"] == str(tiny_checkpoint)
    assert report["prompt_tokens"] == 8 and report["gen_tokens"] == 4
    assert len(report["trials"]) == 2


def test_table_report(tiny_checkpoint):
    result = bench(
        "--model", str(tiny_checkpoint), "--prompt-tokens", "8", "--gen-tokens", "4", "--trials", "1"
    )
    assert result.returncode == 0, result.stderr
    for label in ("prompt tokens/s", "generation tokens/s", "time to first token", "peak memory", "ceiling"):
        assert label in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "564M", "--layers", "0"], "--layers must be from 1 to the 564M preset's 24 layers"),
        (["--model", "MODEL", "--layers", "2"], "--layers applies to --preset only"),
        (["--model", "MODEL", "--trials", "0"], "--trials must be at least 1"),
    ],
)
def test_bad_values_are_one_line_errors(tiny_checkpoint, args, message):
    args = [str(tiny_checkpoint) if a == "MODEL" else a for a in args]
    result = bench(*args)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line


def test_unknown_preset_is_a_usage_error():
    result = bench("--preset", "13B")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_preset_shapes_follow_the_released_checkpoints():
    model = random_model("564M", layers=1, dtype="float16", q_bits=4, q_group_size=64)
    assert model.config.d_model == 1024 and model.config.ffn_dim == 4096
    assert len(model.layers) == 1 and model.config.vocab_size == 256008
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(model.layers[0].fc1, nn.QuantizedLinear)
    assert set(PRESETS) == {"tiny", "564M", "1.7B", "2.9B", "4.5B", "7.5B"}
    with pytest.raises(XGLMError, match="unknown preset"):
        random_model("13B")


def test_benchmark_counts_every_weight_once(tiny_checkpoint):
    model, _ = load(tiny_checkpoint)
    result = benchmark(model, {"model": "tiny"}, prompt_tokens=6, gen_tokens=3, trials=1)
    embed = model.model.embed_tokens.weight
    assert result.weight_bytes == weight_bytes(model) > embed.nbytes
    assert result.ceiling_tps == result.bandwidth / result.weight_bytes
