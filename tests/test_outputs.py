"""Outputs under stress: SIGTERM/SIGHUP mid-write, partial folders of killed writers, umask, a full disk."""

import os
import signal
import stat
import subprocess
import sys

import pytest
from xglm_fixtures import child_process, read_within

from mlx_xglm import XGLMError, convert, load, make_prompt_cache, save_prompt_cache
from mlx_xglm.outputs import remove_stale_partials, staged_file, staged_folder

CONVERT_THAT_WAITS = """
import importlib, sys, time
convert = importlib.import_module("mlx_xglm.checkpoints.convert")
copy = convert.copy_side_files

def copy_then_wait(*args):
    copy(*args)
    print("writing", flush=True)
    time.sleep(60)

convert.copy_side_files = copy_then_wait
from mlx_xglm.cli.main import entry
sys.argv = ["mlx-xglm", "convert", "--hf-path", sys.argv[1], "--mlx-path", sys.argv[2]]
entry()
"""


def clean_env():
    return {k: v for k, v in os.environ.items() if k != "MLX_XGLM_DEBUG"}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_mid_convert_leaves_nothing_behind(tiny_checkpoint, tmp_path, signum):
    out = tmp_path / "out" / "converted"
    with child_process(
        [sys.executable, "-c", CONVERT_THAT_WAITS, str(tiny_checkpoint), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    ) as proc:
        assert read_within(proc.stdout.readline, timeout=120) == "writing\n"
        assert [p.name for p in out.parent.iterdir()][0].startswith(".converted.")  # the hidden folder
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    assert list(out.parent.iterdir()) == []
    assert "Traceback" not in stderr


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def test_the_next_convert_removes_partial_folders_of_dead_writers(tiny_checkpoint, tmp_path):
    stale = tmp_path / f".out.{dead_pid()}.0badc0de.partial"
    (stale / "sub").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".out.{os.getpid()}.0123abcd.partial"
    live.mkdir()
    other = tmp_path / f".other.{dead_pid()}.0badc0de.partial"
    other.mkdir()
    convert(tiny_checkpoint, tmp_path / "out", verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, other.name])


def test_stale_partial_files_of_dead_writers_are_removed(tmp_path):
    stale = tmp_path / f".c.safetensors.{dead_pid()}.0badc0de.partial.safetensors"
    stale.write_bytes(b"x")
    remove_stale_partials(tmp_path / "c.safetensors")
    assert not stale.exists()


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_converted_folders_and_files_follow_the_umask(tiny_checkpoint, tmp_path, umask_027):
    out = convert(tiny_checkpoint, tmp_path / "out", verbose=False).path
    assert mode(out) == 0o750
    assert {mode(f) for f in out.iterdir()} == {0o640}


def test_prompt_cache_files_follow_the_umask(tiny_checkpoint, tmp_path, umask_027):
    model, _ = load(tiny_checkpoint)
    save_prompt_cache(tmp_path / "c.safetensors", make_prompt_cache(model))
    assert mode(tmp_path / "c.safetensors") == 0o640


def test_an_error_inside_a_staged_file_keeps_the_old_target(tmp_path):
    target = tmp_path / "c.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), staged_file(target) as work:
        work.write_text("new")
        raise RuntimeError("boom")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_an_oserror_inside_a_staged_folder_names_the_target(tmp_path):
    expected = rf"cannot write {tmp_path / 'out'}: No space left on device"
    with pytest.raises(XGLMError, match=expected), staged_folder(tmp_path / "out"):
        raise OSError(28, "No space left on device", "/somewhere/else")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 256 kB tmpfs (root only: skipped elsewhere, or where mounting is not allowed)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", disk], capture_output=True, timeout=30
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", disk], check=True, timeout=30)


def test_a_full_disk_during_convert_is_one_line_naming_the_output(tiny_checkpoint, small_disk):
    out = small_disk / "out"
    result = subprocess.run(
        [sys.executable, "-m", "mlx_xglm.cli", "convert", "--hf-path", tiny_checkpoint, "--mlx-path", out],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]  # after the progress bar
    assert last == f"error: cannot write {out}: No space left on device; nothing was written there"
    assert list(small_disk.iterdir()) == []


def test_a_read_only_folder_for_the_prompt_cache_is_refused_before_generating(tiny_checkpoint, small_disk):
    subprocess.run(["mount", "-o", "remount,ro", small_disk], check=True, timeout=30)
    cache = small_disk / "c.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "mlx_xglm.cli", "generate", "--model", tiny_checkpoint, "--prompt", "x"]
        + ["--prompt-cache-file", cache],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"error: --prompt-cache-file {cache}: folder {small_disk} is not writable\n"


def test_a_read_only_filesystem_during_convert_names_the_output(tiny_checkpoint, small_disk):
    subprocess.run(["mount", "-o", "remount,ro", small_disk], check=True, timeout=30)
    with pytest.raises(XGLMError, match=rf"cannot write {small_disk / 'out'}: Read-only file system"):
        convert(tiny_checkpoint, small_disk / "out", verbose=False)
