"""Shared fixtures: the trained tokenizer model and tiny checkpoints in the Hub layout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from xglm_fixtures import build_checkpoint, train_sentencepiece  # noqa: E402

# Never reach the network from tests, whatever the machine allows.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("spm") / "sentencepiece.bpe.model")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, sp_model) -> Path:
    """The default tiny model: 2 layers, d_model 64, 4 heads, gelu, scaled embeddings."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny"), sp_model)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, sp_model):
    """Build another tiny checkpoint: make_checkpoint(seed=..., **config_overrides)."""

    def make(seed: int = 0, **overrides) -> Path:
        return build_checkpoint(tmp_path_factory.mktemp("ckpt"), sp_model, seed=seed, **overrides)

    return make


def reference_required() -> bool:
    """MLX_XGLM_REQUIRE_REFERENCE=1 (CI): reference-parity tests must run, never skip."""
    return os.environ.get("MLX_XGLM_REQUIRE_REFERENCE") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A reference-parity test skipped while it runs (a fixture's importorskip) is a failure in CI."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("reference") and reference_required():
        report.outcome = "failed"
        report.longrepr = f"reference-parity test skipped in CI: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module skipped while it is collected (a module-level importorskip) is a failure in CI: its
    tests, reference-parity ones among them, would vanish without ever reaching the hook above."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and reference_required():
        report.outcome = "failed"
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"{collector.nodeid} skipped at collection in CI: {reason}"


@pytest.fixture(scope="session")
def transformers():
    """transformers 4.56, the reference implementation (dev extra)."""
    return pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def lively_checkpoint(tmp_path_factory, sp_model) -> Path:
    """A tiny model whose output varies under a repetition penalty or sampling.

    With the default fixture the residual stream is dominated by the input token's own (tied) embedding,
    so greedy decoding repeats the last prompt token. Unscaled embeddings and 4x stronger attention and
    MLP outputs break that, so decoding tests with a penalty see varied, multilingual text; plain greedy
    output still settles on one token within a few steps (greedy parity runs on
    xglm_fixtures.varied_weights instead).
    """
    from xglm_fixtures import hub_config, random_weights

    weights = random_weights(hub_config(scale_embedding=False), seed=0)
    for name in weights:
        if name.endswith(("fc2.weight", "out_proj.weight")):
            weights[name] *= 4
    return build_checkpoint(
        tmp_path_factory.mktemp("lively"), sp_model, weights=weights, scale_embedding=False
    )


@pytest.fixture(scope="module")
def lively(lively_checkpoint):
    """The lively checkpoint loaded: (model, tokenizer), once per test module."""
    from mlx_xglm import load

    return load(lively_checkpoint)
