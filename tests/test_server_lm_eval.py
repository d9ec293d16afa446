"""lm-eval's `local-completions` backend scoring through the server equals its `hf` backend on the model."""

from __future__ import annotations

import json

import pytest
from xglm_fixtures import ServerProcess

DOCS = [
    {"question": "Bonjour, je", "choices": [" suis", " mange", " chat"], "answer": 0},
    {"question": "The cat sat on the", "choices": [" mat", " moon", " dog"], "answer": 0},
    {"question": "Der Hund", "choices": [" bellt", " schläft"], "answer": 1},
    {"question": "Hola,", "choices": [" amigo", " mundo", " ¿qué tal?"], "answer": 2},
]

TASK = """\
task: serve_parity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def log_likelihoods(lm_eval, task_dir, model: str, model_args: str) -> list[list[float]]:
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["serve_parity"],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
        batch_size=1,
    )
    samples = sorted(results["samples"]["serve_parity"], key=lambda s: s["doc_id"])
    return [[resp[0][0] for resp in sample["resps"]] for sample in samples]


@pytest.mark.reference
def test_local_completions_log_likelihoods_equal_the_hf_backend(tmp_path, lively_checkpoint, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (tmp_path / "task.yaml").write_text(TASK.format(data=data))
    expected = log_likelihoods(
        lm_eval, tmp_path, "hf", f"pretrained={lively_checkpoint},dtype=float32,device=cpu"
    )
    server = ServerProcess(lively_checkpoint, "--model-id", "tiny")
    try:
        # add_bos_token: lm-eval's hf backend lets XGLM's tokenizer add the leading </s>; so must this one.
        args = (
            f"base_url={server.url}/v1/completions,model=tiny,"
            f"tokenizer_backend=huggingface,tokenizer={lively_checkpoint},add_bos_token=True"
        )
        served = log_likelihoods(lm_eval, tmp_path, "local-completions", args)
    finally:
        assert server.stop() == 0
    assert [len(s) for s in served] == [len(d["choices"]) for d in DOCS]
    for got, want in zip(served, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
