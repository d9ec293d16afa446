"""The comparison scripts in benchmarks/ run end to end at the tiny shape (their figures are quoted in docs/).

Timings are never asserted; what is checked is that each side runs, the report has its paired line, and
the two backends agree where they must (the same perplexity on the same weights).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.reference
def test_lora_train_compare_runs_both_sides(transformers):
    pytest.importorskip("peft")
    args = "--preset tiny --layers 2 --batch-size 2 --seq-len 32 --steps 1 --trials 1 --compare"
    out = run_script("lora_train.py", *args.split())
    assert re.search(r"^mlx-xglm: [\d.]+ tokens/s, peak memory [\d.]+ GB$", out, re.M), out
    assert re.search(r"^transformers \+ peft \(torch [^)]+\): [\d.]+ tokens/s$", out, re.M), out
    assert re.search(r"^paired, .*: per trial [\d.]+; median [\d.]+x, ahead in [01] of 1$", out, re.M), out


@pytest.mark.reference
def test_perplexity_compare_gives_the_same_perplexity_on_both_sides(transformers):
    args = "--preset tiny --layers 2 --tokens 300 --context-length 64 --stride 32 --trials 1"
    out = run_script("perplexity_compare.py", *args.split())
    ours = float(re.search(r"^mlx-xglm perplexity\(\): [\d.]+ s, perplexity (\S+)$", out, re.M).group(1))
    theirs = float(re.search(r"^transformers strided loop: [\d.]+ s, perplexity (\S+)$", out, re.M).group(1))
    # Printed to 6 significant digits, so rounding alone may part them by 5e-6 relative (measured: equal).
    assert ours == pytest.approx(theirs, rel=1e-5), out
    assert re.search(r"^paired, .*: per trial [\d.]+; median [\d.]+x, ahead in [01] of 1$", out, re.M), out
