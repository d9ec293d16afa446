"""The `mlx-xglm` lm-eval backend against lm-eval's own `hf` backend on the same tiny checkpoint.

Both run in this process on local task YAMLs (eval_tasks.py) covering every output type; each sample's
requests must be identical and its responses equal: log-likelihoods within 1e-4, the same is_greedy
flags, the same generated text.
"""

from __future__ import annotations

import pytest
from eval_tasks import LINES, eval_weights, write_tasks

from mlx_xglm import generate, load

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def eval_setup(make_checkpoint, tmp_path_factory):
    path = make_checkpoint(weights=eval_weights(), scale_embedding=False)
    model, tokenizer = load(path)
    greedy = []
    for line in LINES[12:16]:
        context = line[:30].rstrip()
        word = generate(model, tokenizer, context, max_tokens=1)
        greedy.append((context, word.strip()))
    stop = generate(model, tokenizer, LINES[2][:35], max_tokens=6).strip()[2:4]
    folder = tmp_path_factory.mktemp("tasks")
    return path, folder, write_tasks(folder, greedy, stop)


@pytest.fixture(scope="module")
def runs(eval_setup, transformers):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mlx_xglm.evaluation.tasks import evaluate

    path, folder, tasks = eval_setup
    ours = evaluate(str(path), tasks, include_path=str(folder), log_samples=True, batch_size=3)
    ref = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(path), "dtype": "float32"},
        tasks=tasks,
        task_manager=TaskManager(include_path=str(folder)),
        log_samples=True,
        batch_size=4,
        device="cpu",
    )
    return ours, ref


def paired(runs, task):
    ours, ref = runs
    a = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
    b = sorted(ref["samples"][task], key=lambda s: s["doc_id"])
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x["arguments"] == y["arguments"]
    return list(zip(a, b, strict=True))


def assert_loglikelihoods_equal(pairs):
    greedy = []
    for ours, ref in pairs:
        for (lp, is_greedy), (ref_lp, ref_greedy) in zip(
            (r[0] for r in ours["resps"]), (r[0] for r in ref["resps"]), strict=True
        ):
            assert lp == pytest.approx(ref_lp, abs=1e-4)
            assert is_greedy == ref_greedy
            greedy.append(is_greedy)
    return greedy


def test_multiple_choice_with_fewshot_equals_hf_backend(runs):
    pairs = paired(runs, "tiny_mc")
    # Two few-shot examples drawn from the train split, and contexts longer than the 64-token window.
    assert all(ours["arguments"][0][0].count("Answer:") == 3 for ours, _ in pairs)
    assert_loglikelihoods_equal(pairs)
    ours, ref = runs
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][metric] == ref["results"]["tiny_mc"][metric]


def test_loglikelihood_equals_hf_backend_with_greedy_flags(runs):
    greedy = assert_loglikelihoods_equal(paired(runs, "tiny_ll"))
    assert any(greedy) and not all(greedy)


def test_loglikelihood_rolling_longer_than_the_window_equals_hf_backend(runs, eval_setup):
    pairs = paired(runs, "tiny_rolling")
    model, tokenizer = load(eval_setup[0])
    window = model.config.max_position_embeddings
    lengths = [len(tokenizer.encode(ours["arguments"][0][0])) for ours, _ in pairs]
    assert max(lengths) > 2 * window
    for (ours, ref), n in zip(pairs, lengths, strict=True):
        # A document's log-likelihood is the sum of its windows' (lm-eval adds them up): each within 1e-4.
        windows = -(-n // window)
        assert ours["resps"][0][0] == pytest.approx(ref["resps"][0][0], abs=1e-4 * windows)
    assert runs[0]["results"]["tiny_rolling"]["word_perplexity,none"] == pytest.approx(
        runs[1]["results"]["tiny_rolling"]["word_perplexity,none"], rel=1e-5
    )


def test_generate_until_equals_hf_backend(runs):
    pairs = paired(runs, "tiny_gen")
    texts = [ours["resps"][0][0] for ours, _ in pairs]
    assert texts == [ref["resps"][0][0] for _, ref in pairs]
    # Some rows stop at the stop sequence, others run to max_gen_toks.
    assert len(set(texts)) > 1
