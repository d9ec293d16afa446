"""The suite's own rules: reference-parity tests cannot skip past the CI guard (MLX_XGLM_REQUIRE_REFERENCE=1),
and no test waits on a child process without a limit."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

MISSING_IMPORT = """
import pytest

pytest.importorskip("no_such_module_for_mlx_xglm")


@pytest.mark.reference
def test_parity():
    pass
"""


def run_pytest(folder: Path, **env) -> subprocess.CompletedProcess:
    """pytest on `folder` with this suite's conftest.py as a plugin and nothing else of the suite."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "MLX_XGLM_REQUIRE_REFERENCE": "0", **env}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", str(folder)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_module_skipped_at_collection_fails_the_run_in_ci(tmp_path):
    (tmp_path / "test_missing.py").write_text(MISSING_IMPORT)
    (tmp_path / "test_present.py").write_text("def test_present():\n    pass\n")
    outside = run_pytest(tmp_path)
    assert outside.returncode == 0 and "1 passed, 1 skipped" in outside.stdout, outside.stdout
    ci = run_pytest(tmp_path, MLX_XGLM_REQUIRE_REFERENCE="1")
    assert ci.returncode != 0, ci.stdout
    assert "test_missing.py skipped at collection in CI" in ci.stdout
    assert "could not import 'no_such_module_for_mlx_xglm'" in ci.stdout


PIPE_READS = {"read", "readline", "readlines"}
SUBPROCESS_RUNS = {"run", "call", "check_call", "check_output"}


def waits_without_a_limit(source: str) -> list[int]:
    """Lines of `source` that wait on a child with no limit: subprocess runs, communicate() and wait()
    without a timeout, and reads of a child's stdout/stderr pipe (`read_within` bounds those)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.For) and ast.unparse(node.iter).endswith((".stdout", ".stderr")):
            lines.append(node.lineno)
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        name, owner = node.func.attr, node.func.value
        limited = bool(node.args) or any(k.arg == "timeout" for k in node.keywords)
        if name in SUBPROCESS_RUNS and isinstance(owner, ast.Name) and owner.id == "subprocess":
            limited = any(k.arg == "timeout" for k in node.keywords)
        elif name in PIPE_READS and isinstance(owner, ast.Attribute) and owner.attr in ("stdout", "stderr"):
            limited = False
        elif name not in ("communicate", "wait"):
            continue
        if not limited:
            lines.append(node.lineno)
    return sorted(lines)


def test_every_wait_on_a_child_in_the_tests_has_a_timeout():
    found = {
        path.name: lines
        for path in sorted(Path(__file__).parent.glob("*.py"))
        if (lines := waits_without_a_limit(path.read_text()))
    }
    assert found == {}


def test_the_wait_check_sees_each_kind_of_unbounded_wait():
    source = """
subprocess.run(["true"])
proc.communicate()
proc.wait()
proc.stdout.readline()
for line in proc.stderr:
    pass
subprocess.run(["true"], timeout=5)
proc.communicate(timeout=5)
proc.wait(5)
read_within(proc.stdout.readline, timeout=5)
"""
    assert waits_without_a_limit(source) == [2, 3, 4, 5, 6]
