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


class Request:
    """What the backend reads of an lm-eval Instance: its `args`."""

    def __init__(self, *args):
        self.args = args


def test_newlines_eos_reads_newlines_and_fewshot_separators_as_eos(eval_setup):
    import torch
    from reference import reference_model, reference_tokenizer

    from mlx_xglm.evaluation.harness import XGLMEvalModel

    path = eval_setup[0]
    lm = XGLMEvalModel(pretrained=str(path), newlines="eos", batch_size=2)
    hf_model, hf_tokenizer = reference_model(path), reference_tokenizer(path)
    context = "Le chat dort.\nQuestion: what follows?\nAnswer: yes\n\nDer Hund bellt.\nAnswer:"
    ((lp, _),) = lm.loglikelihood([Request(context, " no")])
    # fairseq's layout: each line encoded on its own, a </s> for every newline (two for "\n\n").
    ids = [2]
    for i, line in enumerate(context.split("\n")):
        ids += ([2] if i else []) + hf_tokenizer.encode(line, add_special_tokens=False)
    # The continuation: the pieces " no" adds to the last line, as lm-eval splits the whole text.
    cont = hf_tokenizer.encode("Answer: no", add_special_tokens=False)[
        len(hf_tokenizer.encode("Answer:")) - 1 :
    ]
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids + cont])).logits[0].double()
    expected = torch.log_softmax(logits, -1)[len(ids) - 1 : -1].gather(1, torch.tensor(cont)[:, None]).sum()
    assert lp == pytest.approx(expected.item(), abs=1e-4)


@pytest.fixture(scope="module")
def newline_checkpoint(make_checkpoint):
    """A checkpoint whose greedy continuation of "Москва" holds one </s> between words: varied weights
    with </s>'s embedding 1.8x as long, enough to win that step (by 5.4 logits) and no other."""
    from xglm_fixtures import varied_weights

    weights = varied_weights()
    weights["model.embed_tokens.weight"][2] *= 1.8
    return make_checkpoint(weights=weights)


def test_newlines_eos_generation_shows_eos_as_a_newline_as_transformers_greedy(newline_checkpoint):
    from reference import reference_logits, reference_model, reference_tokenizer

    from mlx_xglm.evaluation.harness import XGLMEvalModel

    hf_model, hf_tokenizer = reference_model(newline_checkpoint), reference_tokenizer(newline_checkpoint)
    lm = XGLMEvalModel(pretrained=str(newline_checkpoint), newlines="eos")
    ab = hf_tokenizer.encode("ab", add_special_tokens=False)
    assert lm._decode([*ab, 2, 2, 130]) == "ab\n\n" + hf_tokenizer.decode([130])
    (text,) = lm.generate_until([Request("Москва", {"until": ["\n\n"], "max_gen_toks": 10})])
    ids, new = hf_tokenizer.encode("Москва"), []
    for _ in range(10):  # transformers' greedy choice at each step; </s> is a newline, not the end
        new.append(int(reference_logits(hf_model, [ids + new])[0, -1].argmax()))
    assert new.count(2) == 1 and new[-1] != 2
    lines, line = [], []
    for token in new:
        if token == 2:
            lines.append(line)
            line = []
        else:
            line.append(token)
    assert text == "\n".join(hf_tokenizer.decode(x) for x in [*lines, line])
