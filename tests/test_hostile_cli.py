"""Careless command lines get one clear line on stderr before any long work, never an internal error."""

from __future__ import annotations

import math

import pytest
from eval_tasks import write_tasks
from lora_fixtures import data_folder
from mlx_xglm.cli.main import main

from mlx_xglm.evaluation.perplexity import exp_nll

# No checkpoint here: an error about the flag proves it came before the model would have loaded.
NO_MODEL = "/nonexistent/model"


def error_line(capsys, args, code: int = 1) -> str:
    assert main([str(a) for a in args]) == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err and "internal error" not in err, err
    assert len(errors[0]) < 400
    return errors[0]


def test_a_port_out_of_range_is_refused_before_loading(capsys):
    with pytest.raises(SystemExit) as e:
        main(["server", "--model", NO_MODEL, "--port", "99999"])
    assert e.value.code == 2
    assert "--port: must be a TCP port from 1 to 65535, got 99999" in capsys.readouterr().err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_folder(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--alpha", "nan"], "--alpha must be a finite number"),
        (["--alpha", "inf"], "--alpha must be a finite number"),
        (["--learning-rate", "inf"], "--learning-rate must be a finite number above 0"),
        (["--seed", "-1"], "--seed must be a whole number"),
        (["--rank", "0"], "--rank must be 1 or more"),
    ],
)
def test_lora_refuses_bad_numbers_before_loading(capsys, data, tmp_path, flags, message):
    args = ["lora", "--model", NO_MODEL, "--train", "--data", data, "--adapter-path", tmp_path / "a", *flags]
    assert message in error_line(capsys, args)
    assert not (tmp_path / "a").exists()


def test_lora_refuses_an_adapter_path_it_cannot_write_before_loading(capsys, data, tmp_path):
    (tmp_path / "file").write_text("x")
    args = ["lora", "--model", NO_MODEL, "--train", "--data", data]
    line = error_line(capsys, [*args, "--adapter-path", tmp_path / "file" / "a"])
    assert "--adapter-path" in line or "file" in line
    line = error_line(capsys, [*args, "--adapter-path", tmp_path / "file"])
    assert "is not a folder" in line


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- iters\n- 5\n", "must hold a mapping of settings"),
        ("iters: .nan\n", "iters must be a finite number"),
        ("iters: 2.5\n", "iters must be a whole number"),
        ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n", "aliases"),
        ("iters: [\n" + "x, " * 100_000, "is not a valid YAML settings file"),
    ],
)
def test_lora_yaml_mistakes_are_one_short_line(capsys, data, tmp_path, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    line = error_line(capsys, ["lora", "--model", NO_MODEL, "--train", "--data", data, "-c", config])
    assert message in line


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_tasks(folder, [("Bonjour", "le")], stop="x")
    (folder / "broken.yaml").write_text(
        (folder / "tiny_mc.yaml")
        .read_text()
        .replace("tiny_mc", "broken_mc")
        .replace("output_type: multiple_choice", "output_type: bogus")
    )
    return folder


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tasks", "tiny_mc", "--limit", "nan"], "--limit must be a number above 0, got nan"),
        (["--tasks", "tiny_mc", "--output-path", "{file}"], "exists and is not a folder"),
        (["--tasks", "broken_mc"], "task broken_mc"),
        (["--tasks", "no_such_task_xyz"], "`lm-eval ls tasks`"),
    ],
)
def test_eval_mistakes_are_refused_before_loading(capsys, tasks, tmp_path, extra, message):
    pytest.importorskip("lm_eval")
    file = tmp_path / "results.json"
    file.write_text("{}")
    extra = [a.format(file=file) for a in extra]
    line = error_line(capsys, ["eval", "--model", NO_MODEL, "--include-path", tasks, *extra])
    assert message in line
    assert file.read_text() == "{}"


def test_a_perplexity_past_709_nats_is_infinite():
    assert exp_nll(800.0, 1) == math.inf
    assert exp_nll(1400.0, 2) == pytest.approx(math.exp(700.0))
