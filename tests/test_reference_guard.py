"""The CI guard (MLX_XGLM_REQUIRE_REFERENCE=1): reference-parity tests cannot skip their way past it."""

from __future__ import annotations

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
