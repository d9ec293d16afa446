"""Data-parallel fine-tuning: `mlx-xglm lora` over 2 ring processes on localhost gives the adapter of one
process, and the pieces that make it so (each rank's rows, dropout masks keyed by a row's place).

Under `mlx.launch --backend ring -n 2`, and with the 2 ranks started one by one (what the launcher does,
without its I/O relay) where a test needs each rank's own folder, arguments and exit status.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from launching import launch_prefix, run_ranks
from lora_fixtures import data_folder, text_rows, write_jsonl

from mlx_xglm.model.dropout import Dropout, batch_rows, dropout_key
from mlx_xglm.model.loss import IGNORE_INDEX
from mlx_xglm.tuning.trainer import share

CLI = [sys.executable, "-m", "mlx_xglm.cli"]
ENV = {k: v for k, v in os.environ.items() if k not in ("MLX_XGLM_DEBUG", "MLX_RANK", "MLX_HOSTFILE")}
ADAPTER = "adapter_model.safetensors"


def lora_args(checkpoint: Path, data: Path, *extra) -> list[str]:
    """Float32 tiny model (dropout 0.1, attention dropout 0.1), LoRA dropout 0.1, a batch of 4 over 10
    rows: batches of 4, 4 and 2 rows, so the 2-row batch gives each rank 1 row."""
    args = ["lora", "--model", checkpoint, "--train", "--data", data, "--batch-size", 4, "--dropout", 0.1]
    return [*CLI, *map(str, [*args, "--learning-rate", 1e-2, "--seed", 3, *extra])]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return data_folder(tmp_path_factory.mktemp("data"), train=10, valid=4, test=4)


def losses(stdout: str) -> list[str]:
    """The report lines without timings (and the test perplexity, the exponential of a loss of 20, which
    rounding moves in the 7th digit): iteration, train, validation and test losses, tokens."""
    timings = r"Tokens/sec [\d.]+, |, Peak mem [\d.]+ GB|, Test ppl .*"
    lines = [re.sub(timings, "", line) for line in stdout.splitlines()]
    return [line for line in lines if line.startswith(("Iter", "Test"))]


def test_two_processes_under_mlx_launch_train_the_adapter_of_one(tiny_checkpoint, data, tmp_path):
    args = lora_args(tiny_checkpoint, data, "--iters", 6, "--steps-per-report", 2, "--steps-per-eval", 3)
    args += ["--val-batches", "-1", "--test"]
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    run = {"env": ENV, "capture_output": True, "text": True}
    one = subprocess.run(args, cwd=tmp_path / "one", timeout=300, **run)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([*launch_prefix(2), "--", *args], cwd=tmp_path / "two", timeout=300, **run)
    assert "exited with code" not in two.stderr and "was killed" not in two.stderr, two.stderr
    assert "Data parallel over 2 processes: 2 of the 4 rows of each batch per process" in two.stdout
    # Rank 0 alone reports, and its figures are the whole batch's: one process's.
    assert losses(two.stdout) == losses(one.stdout)
    assert len(losses(one.stdout)) == 8  # validations at 0, 3, 6; reports at 2, 4, 6; a save; the test
    one_weights, two_weights = (
        mx.load(str(tmp_path / "one" / "adapters" / ADAPTER)),
        mx.load(str(tmp_path / "two" / "adapters" / ADAPTER)),
    )
    assert one_weights.keys() == two_weights.keys()
    for name, weight in one_weights.items():
        assert mx.abs(two_weights[name] - weight).max().item() < 1e-4, name
    assert max(mx.abs(w).max().item() for k, w in one_weights.items() if "lora_B" in k) > 1e-2  # it trained


def test_only_rank_0_writes_the_adapter(tiny_checkpoint, data, tmp_path):
    folders = [tmp_path / "rank0", tmp_path / "rank1"]
    for folder in folders:
        folder.mkdir()
    args = lora_args(tiny_checkpoint, data, "--iters", 1, "--val-batches", 0)
    results = run_ranks([args, args], folders, ENV, timeout=240)
    assert [code for code, _, _ in results] == [0, 0], results
    assert (folders[0] / "adapters" / ADAPTER).is_file()
    assert not (folders[1] / "adapters").exists()
    assert "Saved adapter weights" in results[0][1] and results[1][1] == results[1][2] == ""


def other_data(folder: Path) -> Path:
    """A data folder like `data` but for one training row."""
    other = data_folder(folder, train=10, valid=4, test=4)
    write_jsonl(other / "train.jsonl", text_rows(9) + text_rows(1, offset=30))
    return other


# A failure on one rank: (arguments of rank 0, arguments of rank 1) given the tmp folder, rank 0's line.
FAILURES = {
    "data missing on rank 1": (
        lambda tmp: [],
        lambda tmp: ["--data", tmp / "nowhere"],
        r"error: rank 1: data folder \S*nowhere does not exist; it should hold train.jsonl and valid.jsonl",
    ),
    "different data on rank 1": (
        lambda tmp: [],
        lambda tmp: ["--data", other_data(tmp / "other")],
        r"error: rank 1 has different training or validation data from rank 0; give every rank the same",
    ),
    "adapter path unwritable on rank 0": (
        lambda tmp: ["--adapter-path", tmp / "a-file" / "adapters"],
        lambda tmp: [],
        # Found before the model loads, not after training.
        r"error: cannot write \S*a-file/adapters: \S*a-file is not a folder",
    ),
}


@pytest.mark.parametrize("case", FAILURES, ids=list(FAILURES))
def test_a_failure_on_one_rank_stops_every_rank_with_one_line(tiny_checkpoint, data, tmp_path, case):
    rank0, rank1, line = FAILURES[case]
    (tmp_path / "a-file").write_text("not a folder")
    args = lora_args(tiny_checkpoint, data, "--iters", 1, "--val-batches", 0)
    commands = [[*args, *map(str, rank0(tmp_path))], [*args, *map(str, rank1(tmp_path))]]
    results = run_ranks(commands, [tmp_path, tmp_path], ENV, timeout=240)
    assert [code for code, _, _ in results] == [1, 1], results
    assert re.fullmatch(line, results[0][2].strip()), results[0][2]
    assert results[1][2] == ""  # rank 0 alone says what failed


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tiny_checkpoint, data, tmp_path):
    args = lora_args(tiny_checkpoint, data, "--iters", 1)
    args[args.index("--batch-size") + 1] = "3"
    result = subprocess.run(
        [*launch_prefix(2), "--", *args], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --batch-size 3 does not split evenly over 2 processes; use a multiple of 2"]
    assert "rank 0 exited with code 1" in result.stderr and "rank 1 exited with code 1" in result.stderr


class Group:
    """What `share` asks of an mx.distributed group: this process's rank, and how many there are."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = lambda: rank, lambda: size


def test_each_rank_takes_its_rows_and_a_rank_without_rows_gets_one_that_scores_nothing():
    ids = mx.arange(12).reshape(3, 4)
    batch = (ids, ids + 100)
    parts = [share(batch, Group(rank, 2)) for rank in range(2)]
    assert [(first, ids.tolist()) for first, ids, _ in parts] == [
        (0, [[0, 1, 2, 3]]),
        (1, [[4, 5, 6, 7], [8, 9, 10, 11]]),
    ]
    one_row = (ids[:1], ids[:1])
    first, row, labels = share(one_row, Group(0, 2))  # rows 0 * 1 // 2 up to 1 * 1 // 2: none
    assert first == 0 and row.tolist() == [[0, 1, 2, 3]] and (labels == IGNORE_INDEX).all().item()
    assert share(one_row, Group(1, 2))[2].tolist() == [[0, 1, 2, 3]]


def test_a_row_draws_the_same_dropout_mask_whichever_rows_come_with_it():
    dropout = Dropout(0.5)
    x = mx.ones((4, 3, 8))
    key = mx.random.key(7)
    with dropout_key(key):
        whole = dropout(x)
    with dropout_key(key), batch_rows(2, 4):
        last_two = dropout(x[2:])
    assert mx.array_equal(last_two, whole[2:]).item()
    assert not mx.array_equal(whole[0], whole[1]).item()  # each row its own mask
