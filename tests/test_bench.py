"""`mlx-xglm bench` and mlx_xglm.bench: what they report, not how fast (timings are never asserted)."""

import json
import subprocess
import sys

import mlx.nn as nn
import pytest

from mlx_xglm import XGLMError, load
from mlx_xglm.bench import (
    PRESETS,
    acceptance_rate,
    benchmark,
    make_agreeing_draft,
    preset_config,
    weight_bytes,
)
from mlx_xglm.checkpoints import quantize_model


def bench(*args):
    return subprocess.run(
        [sys.executable, "-m", "mlx_xglm.cli", "bench", *args], capture_output=True, text=True, timeout=300
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
        (["--preset", "564M", "--layers", "0"], "--layers must be from 1 to 24 (the 564M preset's depth)"),
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
    config = preset_config("564M", layers=1)
    assert (config.d_model, config.ffn_dim, config.attention_heads) == (1024, 4096, 16)
    assert config.num_layers == 1 and config.vocab_size == 256008
    assert preset_config("7.5B").num_layers == 32
    assert set(PRESETS) == {"tiny", "564M", "1.7B", "2.9B", "4.5B", "7.5B"}
    with pytest.raises(XGLMError, match="unknown preset"):
        preset_config("13B")


def test_q_bits_quantizes_every_linear_layer_and_the_embedding(tiny_checkpoint):
    model, _ = load(tiny_checkpoint)
    assert quantize_model(model, q_bits=4, q_group_size=32) == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    linears = [m for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    assert linears and all(isinstance(m, nn.QuantizedLinear) and m.bits == 4 for m in linears)


def test_benchmark_counts_every_weight_once(tiny_checkpoint):
    model, _ = load(tiny_checkpoint)
    result = benchmark(model, {"model": "tiny"}, prompt_tokens=6, gen_tokens=3, trials=1)
    embed = model.model.embed_tokens.weight
    assert result.weight_bytes == weight_bytes(model) > embed.nbytes
    assert result.ceiling_tps == result.bandwidth / result.weight_bytes


def test_json_report_with_a_draft_model(tiny_checkpoint):
    result = bench(
        "--model",
        str(tiny_checkpoint),
        "--draft-model",
        str(tiny_checkpoint),
        "--num-draft-tokens",
        "2",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "7",
        "--trials",
        "2",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # The model drafting for itself: every proposal is accepted.
    assert report["acceptance"] == 1.0
    assert report["speculative_speedup"] > 0 and report["plain_generation_tps"] > 0
    assert report["graph_ms_per_token"] > 0
    assert len(report["trials"]) == len(report["plain_trials"]) == 2
    assert report["draft_model"] == str(tiny_checkpoint) and report["num_draft_tokens"] == 2


def test_table_reports_graph_time_and_the_draft(tiny_checkpoint):
    result = bench(
        "--model", str(tiny_checkpoint), "--draft-model", str(tiny_checkpoint), "--gen-tokens", "4",
        "--prompt-tokens", "8", "--trials", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for label in ("host graph time per token", "draft acceptance rate", "speculative speedup"):
        assert label in result.stdout


def test_bad_draft_values_are_one_line_errors(tiny_checkpoint):
    result = bench(
        "--model", str(tiny_checkpoint), "--draft-model", str(tiny_checkpoint), "--num-draft-tokens", "0"
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --num-draft-tokens must be at least 1, got 0"


def test_acceptance_rate_counts_the_proposals_of_each_round():
    # Rounds: 3 proposed, 3 kept; 2 proposed (2 tokens left after it), 1 kept; then the model's last token.
    flags = [True, True, True, False, True, False, False]
    assert acceptance_rate(flags, 3) == 4 / 5


def test_agreeing_draft_keeps_fewer_layers_than_the_model(tiny_checkpoint):
    model, _ = load(tiny_checkpoint)
    with pytest.raises(XGLMError, match="fewer layers") as error:
        make_agreeing_draft(model, 2)
    assert error.value.param == "draft_layers"
    draft = make_agreeing_draft(model, 1)
    assert len(draft.layers) == 1 and draft.layers[0] is model.layers[0]
    assert not model.layers[1].fc2.weight.any().item()
