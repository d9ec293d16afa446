"""Several processes under `mlx.launch --backend ring -n 2` on localhost: tensor parallel and pipelined
generation and the server equal to one process, logits and memory at 564M's widths, and errors that stop
every rank (data-parallel `lora` is tested in test_lora_distributed.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from launching import launch_prefix
from xglm_fixtures import hub_config, random_weights

CLI = [sys.executable, "-m", "mlx_xglm.cli"]
WORKER = Path(__file__).parent / "distributed_worker.py"
# Each launch starts two Pythons that import MLX on a shared 2-core machine.
TIMEOUT = 300


def ring(ranks: int) -> list[str]:
    return [*launch_prefix(ranks), "--"]


def run(command: list, cwd=None, env=None) -> subprocess.CompletedProcess:
    env = {
        **{k: v for k, v in os.environ.items() if k != "MLX_XGLM_DEBUG"},
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    return subprocess.run(
        list(map(str, command)), capture_output=True, text=True, cwd=cwd, env=env, timeout=TIMEOUT
    )


def generate(model: Path, *flags, ranks: int = 1) -> subprocess.CompletedProcess:
    command = [*CLI, "generate", "--model", model, "--prompt", "Bonjour le monde", "-m", 10, "--json", *flags]
    command += ["--repetition-penalty", 1.3]
    return run([*ring(ranks), *command] if ranks > 1 else command)


@pytest.fixture(scope="module")
def one_process(lively_checkpoint):
    result = generate(lively_checkpoint)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("flags", [[], ["--pipeline"]], ids=["tensor", "pipeline"])
def test_two_ranks_generate_the_greedy_tokens_of_one_process(lively_checkpoint, one_process, flags):
    result = generate(lively_checkpoint, *flags, ranks=2)
    assert result.returncode == 0 and "exited with code" not in result.stderr, result.stderr
    (line,) = result.stdout.splitlines() or [result.stderr]  # rank 0 alone prints
    assert len(set(one_process["tokens"])) > 3
    assert json.loads(line)["tokens"] == one_process["tokens"]


def test_quantized_tensor_parallel_and_adapter_pipeline_generate_as_one_process(lively_checkpoint, tmp_path):
    from lora_fixtures import random_adapter

    from mlx_xglm import convert

    quantized = convert(
        lively_checkpoint, tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32, verbose=False
    ).path
    adapter = ["--adapter-path", random_adapter(lively_checkpoint, tmp_path / "adapter")]
    for model, flags in ((quantized, []), (lively_checkpoint, [*adapter, "--pipeline"])):
        one = generate(model, *flags[:2])
        two = generate(model, *flags, ranks=2)
        assert one.returncode == two.returncode == 0 and "exited with code" not in two.stderr, two.stderr
        assert json.loads(two.stdout)["tokens"] == json.loads(one.stdout)["tokens"]


def test_an_adapter_under_tensor_parallelism_is_refused(lively_checkpoint, tmp_path):
    from lora_fixtures import random_adapter

    adapter = random_adapter(lively_checkpoint, tmp_path / "adapter")
    result = generate(lively_checkpoint, "--adapter-path", adapter, ranks=2)
    assert "fuse it into the model first" in one_error_line(result)


def test_pipeline_stages_are_contiguous_and_cover_every_layer_once():
    from mlx_xglm.model.sharding import stage

    for layers, size in ((2, 2), (5, 2), (7, 3), (24, 4)):
        stages = [stage(layers, rank, size) for rank in range(size)]
        assert sorted(i for s in stages for i in s) == list(range(layers))
        assert stages[-1][0] == 0 and stages[0][-1] == layers - 1  # rank 0 runs the last layers
        assert max(map(len, stages)) - min(map(len, stages)) <= 1


def bin_copy(checkpoint: Path, folder: Path) -> Path:
    """`checkpoint` as a float16 `pytorch_model.bin` folder, as the released checkpoints are."""
    import shutil

    import torch
    from safetensors.numpy import load_file

    shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    state = {k: torch.from_numpy(v).half() for k, v in load_file(checkpoint / "model.safetensors").items()}
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_rows_of_a_table_read_alone_equal_the_whole_tables_rows(lively_checkpoint, tmp_path):
    from mlx_xglm.checkpoints import open_checkpoint
    from mlx_xglm.checkpoints.loading import read_tensor
    from mlx_xglm.checkpoints.slices import read_rows

    for folder in (lively_checkpoint, bin_copy(lively_checkpoint, tmp_path / "bin")):
        checkpoint = open_checkpoint(folder)
        name = "model.embed_tokens.weight"
        whole = np.array(read_tensor(checkpoint.tensors[name]))
        rows = read_rows(checkpoint, name, 504, 1008)
        assert rows.dtype == checkpoint.tensors[name].dtype
        np.testing.assert_array_equal(np.array(rows), whole[504:])


def test_a_float16_bin_checkpoint_generates_on_two_ranks_as_on_one(lively_checkpoint, tmp_path):
    folder = bin_copy(lively_checkpoint, tmp_path / "bin")
    one, two = generate(folder), generate(folder, ranks=2)
    assert one.returncode == two.returncode == 0 and "exited with code" not in two.stderr, two.stderr
    assert json.loads(two.stdout)["tokens"] == json.loads(one.stdout)["tokens"]


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory, sp_model):
    """XGLM-564M's widths (d_model 1024, 16 heads, ffn 4096, vocabulary 256,008) with 2 layers."""
    from xglm_fixtures import build_checkpoint

    config = hub_config(d_model=1024, attention_heads=16, ffn_dim=4096, vocab_size=256008, num_layers=2)
    weights = random_weights(config)
    weights["model.embed_tokens.weight"] *= 0.1
    return build_checkpoint(tmp_path_factory.mktemp("wide"), sp_model, weights=weights, **config)


@pytest.fixture(scope="module")
def wide_logits(wide_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("logits")
    for mode, prefix in (("one", []), ("tensor", ring(2)), ("pipeline", ring(2))):
        result = run([*prefix, sys.executable, WORKER, wide_checkpoint, out, mode])
        assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_float32_logits_at_564M_widths_match_one_process(wide_logits, mode):
    one, two = np.load(wide_logits / "one.npy"), np.load(wide_logits / f"{mode}.npy")
    assert one.shape == two.shape == (1, 8, 256008)
    np.testing.assert_allclose(two, one, atol=1e-4, rtol=0)


def test_tensor_parallel_rank_0_peak_memory_is_at_most_0_6_of_one_process(wide_logits):
    def peak(name):
        return json.loads((wide_logits / f"{name}.json").read_text())["peak_memory"]

    assert peak("tensor-0") <= 0.6 * peak("one-0")
    assert peak("tensor-1") <= 0.6 * peak("one-0")


def one_error_line(result: subprocess.CompletedProcess, ranks: int = 2) -> str:
    """Every rank exited non-zero, and stderr carries one error line.

    The launcher itself exits 0 whatever its ranks do; it warns for each rank that failed.
    """
    if ranks == 1:
        assert result.returncode != 0
    else:
        for rank in range(ranks):
            assert re.search(rf"rank {rank} (exited with code -?[1-9]|was killed)", result.stderr), (
                result.stderr
            )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_heads_that_do_not_split_over_the_ranks_stop_every_rank(make_checkpoint):
    result = generate(make_checkpoint(attention_heads=1), ranks=2)
    assert "attention_heads 1 does not split over 2 processes" in one_error_line(result)


def test_more_pipeline_ranks_than_layers_stop_every_rank(make_checkpoint):
    result = generate(make_checkpoint(num_layers=1), "--pipeline", ranks=2)
    assert "cannot pipeline 1 layers over 2 processes" in one_error_line(result)


def test_ranks_that_open_different_checkpoints_stop_every_rank(make_checkpoint, tmp_path):
    for rank, seed in enumerate((0, 1)):
        (tmp_path / f"model{rank}").symlink_to(make_checkpoint(seed=seed))
    script = f'exec "$0" -m mlx_xglm.cli generate --model {tmp_path}/model$MLX_RANK --prompt hi --json'
    result = run([*ring(2), "bash", "-c", script, sys.executable])
    assert "rank 1 has different checkpoint files" in one_error_line(result)


def test_a_launched_rank_without_a_backend_says_so(tiny_checkpoint):
    command = [*CLI, "generate", "--model", tiny_checkpoint, "--prompt", "hi"]
    result = run(command, env={"MLX_RANK": "0", "MLX_WORLD_SIZE": "2"})
    assert "no working distributed backend" in one_error_line(result, ranks=1)


def ask(url: str) -> list:
    """Greedy completion with logprobs, seeded sampling of 2 choices, a streamed greedy chat reply, and the
    echo log-probabilities of two prompts that begin alike."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=120)
    greedy = client.completions.create(
        model="m", prompt="Bonjour le monde", max_tokens=8, temperature=0, logprobs=2,
        extra_body={"repetition_penalty": 1.3},
    )  # fmt: skip
    seeded = client.completions.create(model="m", prompt="Hello", max_tokens=6, temperature=0.8, seed=3, n=2)
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Salut"}], max_tokens=6, temperature=0, stream=True
    )
    chat = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    # Echo scores of two prompts with one beginning: the second continues from the prefix cache on every rank.
    echoes = [
        client.completions.create(
            model="m", prompt=f"Bonjour le monde, {w}", max_tokens=1, echo=True, logprobs=1, temperature=0
        )
        .choices[0]
        .logprobs.token_logprobs[1:]
        for w in ("oui", "non")
    ]
    choice = greedy.choices[0]
    return [choice.text, choice.logprobs.token_logprobs, [c.text for c in seeded.choices], chat, echoes]


def test_server_on_two_ranks_answers_as_one_process_and_stops_with_the_launcher(lively_checkpoint):
    import signal
    import time

    import httpx
    from xglm_fixtures import ServerProcess, free_port

    server = ServerProcess(lively_checkpoint)
    try:
        one = ask(server.url)
    finally:
        server.stop()
    port = free_port()
    command = [*ring(2), *CLI, "server", "--model", lively_checkpoint, "--port", port]
    launcher = subprocess.Popen(
        list(map(str, command)), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        children = subprocess.run(
            ["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True, timeout=10
        )
        ranks = [int(pid) for pid in children.stdout.split()]
        assert len(ranks) == 2
        two = ask(f"http://127.0.0.1:{port}")
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(30)
    assert two[0] == one[0] and two[2:4] == one[2:4]
    np.testing.assert_allclose(two[1], one[1], atol=1e-4)
    for a, b in zip(two[4], one[4], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks)  # SIGTERM to the launcher stops every rank
