"""`mlx-xglm eval` and `mlx-xglm perplexity` in subprocesses: files, tables, errors, and 2 processes under
`mlx.launch --backend ring` giving exactly what 1 process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from eval_tasks import LINES, eval_weights, write_tasks
from launching import launch_prefix

CLI = [sys.executable, "-m", "mlx_xglm.cli"]


@pytest.fixture(scope="module")
def setup(make_checkpoint, tmp_path_factory):
    path = make_checkpoint(weights=eval_weights(), scale_embedding=False)
    folder = tmp_path_factory.mktemp("cli_tasks")
    greedy = [(LINES[12][:30].rstrip(), "the")]
    # tiny_ll's perplexity metric costs lm-eval a 100000-round bootstrap per process; the parity tests
    # (test_eval_harness.py) cover it.
    tasks = [t for t in write_tasks(folder, greedy, stop="ں") if t != "tiny_ll"]
    data = tmp_path_factory.mktemp("data")
    (data / "en.txt").write_text("\n".join(LINES[:6]), encoding="utf-8")
    (data / "fr.txt").write_text("\n".join(LINES[6:9]), encoding="utf-8")
    (data / "empty.txt").write_text(" \n", encoding="utf-8")
    return path, folder, tasks, data


def run(args, cwd, launch: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLX_XGLM_DEBUG"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [*CLI, *map(str, args)]
    if launch > 1:
        command = [*launch_prefix(launch), "--", *command]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def read_outputs(folder: Path) -> tuple[dict, dict]:
    (results_file,) = folder.rglob("results_*.json")
    samples = {}
    for f in folder.rglob("samples_*.jsonl"):
        rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()]
        task = f.name[len("samples_") :].rsplit("_", 1)[0]
        samples[task] = sorted(((r["doc_id"], r["arguments"], r["resps"]) for r in rows), key=lambda r: r[0])
    return json.loads(results_file.read_text(encoding="utf-8")), samples


@pytest.fixture(scope="module")
def one_process(setup, tmp_path_factory):
    path, folder, tasks, _ = setup
    out = tmp_path_factory.mktemp("out1")
    # Small (3 documents a task, 2 requests a batch) but several batches per request type, so that
    # both ranks of the 2-process run get work: under mlx.launch each rank gets a fraction of a core on a
    # 2-core machine, since the launcher's own I/O loop keeps one busy.
    args = ["eval", "--model", path, "--tasks", ",".join(tasks), "--include-path", folder]
    args += ["--limit", 3, "--batch-size", 2]
    result = run([*args, "--output-path", out / "results", "--log-samples"], cwd=out)
    assert result.returncode == 0, result.stderr
    return result, out / "results", args


def test_eval_writes_lm_eval_results_and_samples_and_prints_the_table(one_process, setup):
    result, out, _ = one_process
    results, samples = read_outputs(out)
    assert set(results["results"]) == set(setup[2]) == set(samples)
    assert results["config"]["model"] == "mlx-xglm"
    assert "|tiny_mc" in result.stdout and "acc_norm" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert any("cut on the left" in w for w in warnings)
    assert not list(out.parent.glob(".mlx-xglm-eval-*"))  # the staging folder is gone


def test_two_processes_under_mlx_launch_equal_one(one_process, tmp_path):
    _, out1, args = one_process
    result = run([*args, "--output-path", tmp_path / "results", "--log-samples"], cwd=tmp_path, launch=2)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("|tiny_mc") == 1  # rank 0 alone prints
    results1, samples1 = read_outputs(out1)
    results2, samples2 = read_outputs(tmp_path / "results")
    assert results2["results"] == results1["results"]
    assert samples2 == samples1


def test_perplexity_rows_total_and_json(setup, tmp_path):
    path, _, _, data = setup
    files = [data / "en.txt", data / "fr.txt"]
    args = ["perplexity", "--model", path, "--data", *files, "--context-length", 48, "--stride", 20, "--json"]
    one = run(args, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    report = json.loads(one.stdout.strip().splitlines()[-1])
    assert [f["file"] for f in report["files"]] == [str(f) for f in files]
    assert report["tokens"] == sum(f["tokens"] for f in report["files"])
    assert report["nll"] == pytest.approx(sum(f["nll"] for f in report["files"]))
    two = run(args, cwd=tmp_path, launch=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout == one.stdout


def test_perplexity_table_has_a_row_per_file_and_the_total(setup, capsys):
    from mlx_xglm.cli.main import main

    path, _, _, data = setup
    assert (
        main(["perplexity", "--model", str(path), "--data", str(data / "en.txt"), str(data / "fr.txt")]) == 0
    )
    out = capsys.readouterr().out
    assert "en.txt" in out and "fr.txt" in out and "total" in out


def main_error(capsys, args) -> str:
    """Run the command in this process (as the subprocess tests above do): its one `error:` line."""
    from mlx_xglm.cli.main import main

    assert main([str(a) for a in args]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tasks", "no_such_task_xyz"], "unknown task(s): no_such_task_xyz"),
        (["--tasks", "tiny_mc", "--include-path", "/nonexistent/tasks"], "include path /nonexistent/tasks"),
        (["--tasks", "tiny_mc", "--num-fewshot", "7"], "--num-fewshot=7 is more than task tiny_mc"),
        (["--tasks", "tiny_mc", "--log-samples"], "--log-samples needs --output-path"),
        (["--tasks", "tiny_gen", "--batch-size", "0"], "--batch-size must be 1 or more"),
    ],
)
def test_eval_bad_input_is_one_line_and_exit_1(setup, capsys, extra, message):
    path, folder, _, _ = setup
    args = ["eval", "--model", path, "--include-path", folder, *extra]
    if "--include-path" in extra:
        args = ["eval", "--model", path, *extra]
    assert message in main_error(capsys, args)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "{data}/empty.txt"], "empty.txt is empty"),
        (["--data", "{data}/missing.txt"], "missing.txt does not exist"),
        (["--data", "{data}/en.txt", "--stride", "0"], "--stride must be between 1"),
    ],
)
def test_perplexity_bad_input_is_one_line_and_exit_1(setup, capsys, extra, message):
    path, _, _, data = setup
    args = ["perplexity", "--model", path, *[a.format(data=data) for a in extra]]
    assert message in main_error(capsys, args)
