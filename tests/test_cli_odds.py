"""Command-line odds: bad seeds and bytes, flags that would be ignored, closed pipes, the exit with a
preloaded OpenBLAS or MKL, the BLAS bench names, `mlx-xglm tiny`, and bench's progress lines."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from xglm_fixtures import child_process, read_within

from mlx_xglm import load

CLI = [sys.executable, "-m", "mlx_xglm.cli"]
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
MKL = Path(sys.prefix) / "lib" / "libmkl_rt.so.3"  # pip install mkl


def env(**extra):
    return {**{k: v for k, v in os.environ.items() if k != "MLX_XGLM_DEBUG"}, "HF_HUB_OFFLINE": "1", **extra}


def run(*args, input=None, timeout=120, **extra_env):
    args = [a if isinstance(a, bytes) else str(a) for a in args]
    return subprocess.run(
        [*CLI, *args], input=input, capture_output=True, env=env(**extra_env), timeout=timeout
    )


def one_error_line(result) -> str:
    assert result.returncode == 1, result.stderr
    stderr = result.stderr.decode()
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    return stderr


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_seed_mlx_cannot_take_is_one_line(tiny_checkpoint, seed):
    result = run("generate", "--model", tiny_checkpoint, "--prompt", "x", "--seed", seed)
    assert "--seed must be from 0 to 2**64 - 1" in one_error_line(result)


def test_a_non_utf8_prompt_argument_is_one_line(tiny_checkpoint):
    result = run("generate", "--model", tiny_checkpoint, "--prompt", b"caf\xe9")
    assert "--prompt is not UTF-8 text" in one_error_line(result)


def test_non_utf8_chat_input_is_one_line(tiny_checkpoint):
    result = run("chat", "--model", tiny_checkpoint, "-m", 2, input=b"hello\nbad \xff byte\n")
    assert "the chat input is not UTF-8 text" in one_error_line(result)


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--q-bits", 7], "--q-bits"),
        (["--q-group-size", 32], "--q-group-size"),
        (["--q-mode", "mxfp4"], "--q-mode"),
        (["--embed-bits", 8], "--embed-bits"),
    ],
)
def test_quantization_flags_without_quantize_are_refused(tiny_checkpoint, tmp_path, flags, flag):
    result = run("convert", "--hf-path", tiny_checkpoint, "--mlx-path", tmp_path / "out", *flags)
    assert f"error: {flag} only applies when quantizing" in one_error_line(result)
    assert not (tmp_path / "out").exists()


def test_a_bad_embed_bits_names_embed_bits(tiny_checkpoint, tmp_path):
    result = run(
        "convert", "--hf-path", tiny_checkpoint, "--mlx-path", tmp_path / "out", "-q", "--embed-bits", 7
    )
    assert one_error_line(result).startswith("error: --embed-bits 7 is not supported in affine mode")


def test_bench_layers_beyond_the_preset_are_refused():
    result = run("bench", "--preset", "tiny", "--layers", 3)
    assert "--layers must be from 1 to 2 (the tiny preset's depth), got 3" in one_error_line(result)


def test_a_revision_for_a_local_folder_is_refused(tiny_checkpoint, tmp_path):
    result = run("generate", "--model", tiny_checkpoint, "--revision", "v2", "--prompt", "x")
    assert "revision 'v2' applies to Hub repo ids" in one_error_line(result)
    result = run("convert", "--hf-path", tiny_checkpoint, "--revision", "v2", "--mlx-path", tmp_path / "out")
    assert "applies to Hub repo ids" in one_error_line(result)


def test_a_closed_pipe_is_a_quiet_normal_end(tiny_checkpoint):
    proc = subprocess.Popen(
        [*CLI, "generate", "--model", str(tiny_checkpoint), "--prompt", "The dog", "-m", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env(),
    )
    proc.stdout.close()  # the reader is gone before the first word, as with `| head -c 0`
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and stderr == b""


@pytest.mark.skipif(not OPENBLAS.exists(), reason="Debian's libopenblas0-pthread is not installed")
def test_bench_exits_with_openblas_preloaded():
    """The interpreter's normal exit hangs in OpenBLAS's thread shutdown once a large matrix-vector
    product ran on its pool (512 MB of weights or more: 564M's embedding as the head is one)."""
    result = run_big_bench(OPENBLAS)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["layers"] == 1 and report["blas"] == f"OpenBLAS ({OPENBLAS})"


@pytest.mark.skipif(not MKL.exists(), reason="pip's mkl package is not installed in this environment")
def test_bench_exits_with_mkl_preloaded_and_names_it():
    result = run_big_bench(MKL)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["blas"] == f"Intel MKL ({MKL})"


def test_bench_names_the_bundled_reference_blas_without_a_preload():
    result = run(
        "bench", "--preset", "tiny", "--prompt-tokens", 4, "--gen-tokens", 2, "--trials", 1, "--json"
    )
    assert result.returncode == 0, result.stderr
    if sys.platform == "darwin":
        assert json.loads(result.stdout)["blas"] == "Accelerate"
    else:
        assert json.loads(result.stdout)["blas"].startswith("reference BLAS (")


def run_big_bench(preload: Path) -> subprocess.CompletedProcess:
    """A bench that runs a 512 MB matrix-vector product on the preloaded BLAS, then exits."""
    args = [
        "bench",
        "--preset",
        "564M",
        "--layers",
        1,
        "--prompt-tokens",
        4,
        "--gen-tokens",
        2,
        "--trials",
        1,
    ]
    return run(*args, "--json", timeout=300, LD_PRELOAD=str(preload))


def test_tiny_writes_the_checkpoint_the_tests_use(tiny_checkpoint, tmp_path):
    result = run("tiny", "--mlx-path", tmp_path / "tiny-xglm")
    assert result.returncode == 0, result.stderr
    model, tokenizer = load(tmp_path / "tiny-xglm")
    fixture_model, fixture_tokenizer = load(tiny_checkpoint)
    assert model.config == fixture_model.config
    ids = [2, 268, 9, 40, 1000]
    logits, expected = model(mx.array([ids])), fixture_model(mx.array([ids]))
    assert np.array_equal(np.array(logits), np.array(expected))
    text = "Il était une fois, 敏捷的棕色狐狸 and Москва"
    assert tokenizer.encode(text) == fixture_tokenizer.encode(text)
    again = run("tiny", "--mlx-path", tmp_path / "tiny-xglm")
    assert "already exists" in one_error_line(again)


def test_bench_prints_each_trial_to_stderr_as_it_finishes():
    args = ["bench", "--preset", "tiny", "--prompt-tokens", "64", "--gen-tokens", "300", "--trials", "3"]
    with child_process(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
    ) as proc:
        first = read_within(proc.stderr.readline, timeout=120)
        running = proc.poll() is None
        proc.communicate(timeout=120)
    assert first.startswith("trial 1/3: prompt ") and running
