"""`mlx-xglm generate` and the command's error policy, run as a user would: in a subprocess."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pexpect
import pytest
from mlx_xglm.cli.main import build_parser, error_line
from xglm_fixtures import default_signals, fill_hub_cache, hub_config, random_weights

from mlx_xglm import (
    XGLMError,
    __version__,
    generate,
    load,
    make_logits_processors,
    make_prompt_cache,
    make_sampler,
)

CLI = [sys.executable, "-m", "mlx_xglm.cli"]
FOOTER = re.compile(
    r"==========\nPrompt: \d+ tokens, [\d.]+ tokens-per-sec\n"
    r"Generation: \d+ tokens, [\d.]+ tokens-per-sec\nPeak memory: [\d.]+ GB\n"
)
PROMPT = "The dog"


@pytest.fixture
def cli_env(tmp_path):
    """An environment with an empty Hub cache, offline, and no debug tracebacks."""
    drop = ("MLX_XGLM_DEBUG", "NO_COLOR", "FORCE_COLOR", "HF_HUB_CACHE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    return env


@pytest.fixture
def mlx_xglm(cli_env):
    def run(*args, input: str | bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*CLI, *map(str, args)],
            input=input.encode() if isinstance(input, str) else input,
            capture_output=True,
            env={**cli_env, **(env or {})},
            timeout=120,
        )

    return run


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint)
    return tiny_checkpoint, model, tokenizer


def api_text(model, tokenizer, prompt, max_tokens, seed=None, **kwargs):
    if seed is not None:
        mx.random.seed(seed)
    return generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs)


def test_generate_prints_the_text_the_python_api_generates(tiny, mlx_xglm):
    path, model, tokenizer = tiny
    out = mlx_xglm("generate", "--model", path, "--prompt", PROMPT, "--max-tokens", 30)
    assert out.returncode == 0, out.stderr
    expected = api_text(model, tokenizer, PROMPT, 30)
    assert expected and out.stdout.decode() == expected + "\n"


@pytest.fixture(scope="module")
def flat(make_checkpoint):
    """A checkpoint with flat next-token distributions, so that sampling settings change the text."""
    weights = random_weights(hub_config(), seed=1)
    weights["model.layer_norm.weight"] *= 0.05
    weights["model.layer_norm.bias"] *= 0.05
    path = make_checkpoint(weights=weights)
    return (path, *load(path))


def test_sampling_flags_match_the_python_api(flat, mlx_xglm):
    path, model, tokenizer = flat
    flags = ["--temp", 0.8, "--top-p", 0.9, "--top-k", 50, "--min-p", 0.01, "--repetition-penalty", 1.3]
    texts = {}
    for seed in (7, 8):
        out = mlx_xglm("generate", "--model", path, "--prompt", PROMPT, "-m", 25, "--seed", seed, *flags)
        assert out.returncode == 0, out.stderr
        texts[seed] = out.stdout.decode()
    assert texts[7] != texts[8]
    sampler = make_sampler(temp=0.8, top_p=0.9, top_k=50, min_p=0.01)
    processors = make_logits_processors(repetition_penalty=1.3)
    expected = api_text(model, tokenizer, PROMPT, 25, seed=7, sampler=sampler, logits_processors=processors)
    assert texts[7] == expected + "\n"


def test_newlines_eos_and_escaped_newlines_in_the_prompt(tiny, mlx_xglm):
    path, model, tokenizer = tiny
    out = mlx_xglm("generate", "--model", path, "--prompt", r"First line\nSecond", "--newlines", "eos")
    assert out.returncode == 0, out.stderr
    expected = api_text(model, tokenizer, "First line\nSecond", 100, newlines="eos")
    assert out.stdout.decode() == expected + "\n"


def test_stop_string_ends_the_text_before_it(tiny, mlx_xglm):
    path, model, tokenizer = tiny
    full = api_text(model, tokenizer, PROMPT, 30)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    out = mlx_xglm("generate", "--model", path, "--prompt", PROMPT, "-m", 30, "--stop", stop, "--json")
    result = json.loads(out.stdout)
    assert result["text"] == full[: full.index(stop)]
    assert result["finish_reason"] == "stop"


def test_prompt_from_stdin(tiny, mlx_xglm):
    path, model, tokenizer = tiny
    out = mlx_xglm("generate", "--model", path, "--prompt", "-", "-m", 20, input=PROMPT + "\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == api_text(model, tokenizer, PROMPT, 20) + "\n"


def test_prompt_from_a_file(tiny, mlx_xglm, tmp_path):
    path, model, tokenizer = tiny
    (tmp_path / "prompt.txt").write_text("Le chat\n", encoding="utf-8")
    out = mlx_xglm("generate", "--model", path, "--prompt-file", tmp_path / "prompt.txt", "-m", 20)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == api_text(model, tokenizer, "Le chat", 20) + "\n"


def test_json_prints_one_object(tiny, mlx_xglm):
    path, model, tokenizer = tiny
    out = mlx_xglm("generate", "--model", path, "--prompt", PROMPT, "-m", 12, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == {"text", "tokens", "finish_reason", "stats"}
    assert result["text"] == api_text(model, tokenizer, PROMPT, 12)
    assert result["finish_reason"] in ("length", "stop")
    assert result["stats"]["prompt_tokens"] == len(tokenizer.encode(PROMPT))
    assert result["stats"]["generation_tokens"] == len(result["tokens"])
    assert out.stderr == b""


def test_piped_stdout_is_plain_text_and_the_footer_goes_to_stderr(tiny, mlx_xglm):
    path, model, tokenizer = tiny
    out = mlx_xglm("generate", "--model", path, "--prompt", PROMPT, "-m", 10)
    assert b"\x1b" not in out.stdout and b"\x1b" not in out.stderr
    assert out.stdout.decode() == api_text(model, tokenizer, PROMPT, 10) + "\n"
    assert FOOTER.fullmatch(out.stderr.decode())


def test_quiet_prints_only_the_text(tiny, mlx_xglm):
    path, model, tokenizer = tiny
    out = mlx_xglm("generate", "--model", path, "--prompt", PROMPT, "-m", 5, "--quiet")
    assert out.returncode == 0 and out.stderr == b""
    assert out.stdout.decode() == api_text(model, tokenizer, PROMPT, 5) + "\n"


def test_prompt_cache_file_is_written_then_continued(tiny, mlx_xglm, tmp_path):
    path, model, tokenizer = tiny
    cache_file = tmp_path / "prompt.safetensors"
    first = mlx_xglm(
        "generate", "--model", path, "--prompt", PROMPT, "-m", 3, "--prompt-cache-file", cache_file
    )
    assert first.returncode == 0, first.stderr
    assert cache_file.is_file()
    second = mlx_xglm(
        "generate",
        "--model",
        path,
        "--prompt",
        "is here",
        "-m",
        15,
        "--prompt-cache-file",
        cache_file,
        "--json",
    )
    result = json.loads(second.stdout)
    assert result["stats"]["prompt_tokens"] == len(tokenizer.encode("is here", add_special_tokens=False))
    assert result["text"] == api_text(model, tokenizer, PROMPT + " is here", 15)


def test_max_kv_size_cannot_change_a_saved_prompt_cache(tiny, mlx_xglm, tmp_path):
    path, *_ = tiny
    cache_file = tmp_path / "prompt.safetensors"
    mlx_xglm("generate", "--model", path, "--prompt", PROMPT, "-m", 1, "--prompt-cache-file", cache_file)
    out = mlx_xglm(
        "generate", "--model", path, "-p", "more", "--prompt-cache-file", cache_file, "--max-kv-size", 8
    )
    assert_one_error_line(out, "prompt.safetensors", "--max-kv-size 8")


def test_max_kv_size_matches_the_python_api(tiny, mlx_xglm):
    path, model, tokenizer = tiny
    out = mlx_xglm("generate", "--model", path, "--prompt", PROMPT, "-m", 40, "--max-kv-size", 16)
    assert out.returncode == 0, out.stderr
    cache = make_prompt_cache(model, max_kv_size=16)
    assert out.stdout.decode() == api_text(model, tokenizer, PROMPT, 40, prompt_cache=cache) + "\n"


@pytest.mark.parametrize(
    "args",
    [["generate", "--max-tokens", "many"], ["generate", "--no-such-flag"], ["generate", "--newlines", "tab"]],
)
def test_bad_flags_print_usage_and_exit_2(mlx_xglm, args):
    out = mlx_xglm(*args, "--prompt", PROMPT)
    assert out.returncode == 2
    assert out.stderr.decode().startswith("usage: mlx-xglm generate")


def assert_one_error_line(out, *fragments):
    err = out.stderr.decode()
    assert out.returncode == 1, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err
    assert out.stdout == b""


def test_no_prompt_on_a_terminal_is_a_usage_error(tiny, cli_env):
    child = pexpect.spawn(CLI[0], [*CLI[1:], "generate", "--model", str(tiny[0])], env=cli_env, timeout=30)
    child.expect("usage: mlx-xglm generate")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2


def test_missing_model_folder(mlx_xglm, tmp_path):
    out = mlx_xglm("generate", "--model", tmp_path / "nowhere", "--prompt", PROMPT)
    assert_one_error_line(out, "nowhere", "does not exist")


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--temp", "-1", "--temp must be >= 0"),
        ("--top-p", "1.5", "--top-p must be in (0, 1]"),
        ("--max-tokens", "-3", "--max-tokens must be"),
        ("--max-kv-size", "0", "--max-kv-size must be"),
    ],
)
def test_bad_value_names_the_flag(tiny, mlx_xglm, flag, value, message):
    out = mlx_xglm("generate", "--model", tiny[0], "--prompt", PROMPT, flag, value)
    assert_one_error_line(out, message)


def test_the_parameter_at_fault_is_shown_as_the_commands_flag():
    flags = build_parser().parse_args(["convert", "--hf-path", "x"]).flags
    assert flags["mlx_path"] == "--mlx-path" and flags["quantize"] == "--quantize"
    error = XGLMError("mlx_path /tmp/mlx_path/out already exists", param="mlx_path")
    assert error_line(error, flags) == "error: --mlx-path /tmp/mlx_path/out already exists"
    assert error_line(XGLMError("temp must be >= 0", param="temp"), flags) == "error: temp must be >= 0"
    assert error_line(XGLMError("no such file"), flags) == "error: no such file"


def test_unreadable_prompt_file(tiny, mlx_xglm, tmp_path):
    out = mlx_xglm("generate", "--model", tiny[0], "--prompt-file", tmp_path / "missing.txt")
    assert_one_error_line(out, "cannot read prompt file", "missing.txt")


def test_prompt_file_that_is_not_utf8(tiny, mlx_xglm, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    out = mlx_xglm("generate", "--model", tiny[0], "--prompt-file", tmp_path / "latin1.txt")
    assert_one_error_line(out, "latin1.txt", "not UTF-8")


def test_default_model_from_the_local_hub_cache_offline(tiny, mlx_xglm, cli_env):
    path, model, tokenizer = tiny
    fill_hub_cache(Path(cli_env["HF_HOME"]), "facebook/xglm-564M", path)
    out = mlx_xglm("generate", "--prompt", PROMPT, "-m", 10)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == api_text(model, tokenizer, PROMPT, 10) + "\n"


def test_hub_id_missing_from_the_offline_cache_suggests_a_local_path(mlx_xglm):
    out = mlx_xglm("generate", "--prompt", PROMPT)
    assert_one_error_line(out, "facebook/xglm-564M", "not in the local Hub cache", "--model PATH")


def test_debug_variable_shows_the_traceback(mlx_xglm, tmp_path):
    out = mlx_xglm(
        "generate", "--model", tmp_path / "nowhere", "--prompt", PROMPT, env={"MLX_XGLM_DEBUG": "1"}
    )
    assert out.returncode != 0
    assert "Traceback" in out.stderr.decode() and "XGLMError" in out.stderr.decode()


@pytest.mark.parametrize("command", [[], ["generate"], ["chat"], ["convert"]])
def test_help_has_examples(mlx_xglm, command):
    out = mlx_xglm(*command, "--help")
    assert out.returncode == 0
    assert "examples:" in out.stdout.decode()


def test_version(mlx_xglm):
    out = mlx_xglm("--version")
    assert out.returncode == 0 and out.stdout.decode().strip() == f"mlx-xglm {__version__}"


def test_ctrl_c_keeps_the_text_prints_the_stats_and_exits_130(tiny, cli_env):
    args = ["generate", "--model", str(tiny[0]), "--prompt", PROMPT, "--max-tokens", "100000", "--temp", "1"]
    child = pexpect.spawn(CLI[0], [*CLI[1:], *args], env=cli_env, timeout=60, preexec_fn=default_signals)
    child.logfile_read = io.BytesIO()
    child.expect_exact("Reading the prompt")
    child.expect_exact("\x1b[?25h")  # the spinner is done
    child.expect(r"\w+ \w+ \w+")  # and text is streaming
    child.kill(signal.SIGINT)
    child.expect(r"Generation: (\d+) tokens")
    assert 0 < int(child.match.group(1)) < 100000
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    shown = child.logfile_read.getvalue()
    assert b"Peak memory" in shown and b"Traceback" not in shown
    # The terminal is left clean: the cursor the spinner hid is shown again.
    assert shown.rfind(b"\x1b[?25h") >= shown.rfind(b"\x1b[?25l")
