"""The scoring API (score, loglikelihood, rank, perplexity) against transformers 4.56 on tiny checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
from eval_tasks import LINES, eval_weights
from reference import reference_model, reference_tokenizer

from mlx_xglm import XGLMError, load
from mlx_xglm.evaluation import encode_pair, loglikelihood, loglikelihood_tokens, perplexity, rank, score
from mlx_xglm.evaluation import forward as scoring_forward

TEXTS = [
    "The quick brown fox jumps.",
    "Le chat\ndort ici.\n\nDer Hund",
    "x",
    LINES[5],
    "Москва\nявляется столицей",
]


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint(weights=eval_weights(), scale_embedding=False)


@pytest.fixture(scope="module")
def ours(ckpt):
    return load(ckpt)


@pytest.fixture(scope="module")
def ref(ckpt, transformers):
    return reference_model(ckpt), reference_tokenizer(ckpt)


def ref_logprobs(model, ids: list[int]) -> np.ndarray:
    """transformers' log p(ids[i] | ids[:i]) for i >= 1, in float64."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return lp.numpy()


@pytest.mark.reference
def test_score_equals_transformers(ours, ref):
    model, tokenizer = ours
    for text, scored in zip(TEXTS, score(model, tokenizer, TEXTS, batch_size=2), strict=True):
        assert scored.tokens == ref[1].encode(text)
        np.testing.assert_allclose(scored.logprobs, ref_logprobs(ref[0], scored.tokens), atol=1e-4)
        assert scored.total == pytest.approx(sum(scored.logprobs))


@pytest.mark.reference
def test_score_newlines_eos_equals_fairseq_layout_scored_by_transformers(ours, ref):
    model, tokenizer = ours
    hf_model, hf_tokenizer = ref
    for text, scored in zip(TEXTS, score(model, tokenizer, TEXTS, newlines="eos"), strict=True):
        # fairseq's lm.score(text, replace_newline_with_eos=True): each line encoded on its own, lines
        # joined by </s>, a leading </s>; every token after it scored.
        lines = [hf_tokenizer.encode(line, add_special_tokens=False) for line in text.split("\n")]
        ids = [2] + [t for i, line in enumerate(lines) for t in ([2] if i else []) + line]
        assert scored.tokens == ids
        np.testing.assert_allclose(scored.logprobs, ref_logprobs(hf_model, ids), atol=1e-4)
    assert score(model, tokenizer, ["a\nb"], newlines="eos")[0].tokens.count(2) == 2


@pytest.mark.reference
def test_loglikelihood_equals_transformers_on_the_whole_sequence(ours, ref):
    model, tokenizer = ours
    requests = [
        (LINES[0][:40], " the dog"),
        (LINES[0][:40], " a cat and"),
        ("Der Hund ", "bellt"),
        ("", "Hello"),
    ]
    for (ctx, cont), (lp, greedy) in zip(requests, loglikelihood(model, tokenizer, requests), strict=True):
        context_ids, cont_ids = encode_pair(tokenizer, ctx, cont)
        expected = ref_logprobs(ref[0], context_ids + cont_ids)[-len(cont_ids) :]
        assert lp == pytest.approx(expected.sum(), abs=1e-4)
        assert isinstance(greedy, bool)


def test_encode_pair_moves_trailing_spaces_to_the_continuation(ours):
    _, tokenizer = ours
    assert encode_pair(tokenizer, "The dog ", "barks") == encode_pair(tokenizer, "The dog", " barks")
    context, cont = encode_pair(tokenizer, "", "Hello", prefix_token_id=0)
    assert context == [0] and cont == tokenizer.encode("Hello", add_special_tokens=False)
    assert encode_pair(tokenizer, "a\nb", " c", newlines="eos")[0] == tokenizer.encode("a\nb", newlines="eos")


def test_a_shared_context_is_read_once(ours, monkeypatch):
    model, tokenizer = ours
    rows_read = []
    original = scoring_forward._padded_forward

    def counting(model, inputs, *args, **kwargs):
        rows_read.append(tuple(inputs.shape))
        return original(model, inputs, *args, **kwargs)

    monkeypatch.setattr(scoring_forward, "_padded_forward", counting)
    context = LINES[2][:60]
    candidates = [" yes", " no way", " perhaps not", " never ever again"]
    shared = loglikelihood(model, tokenizer, [(context, c) for c in candidates])
    context_len = len(tokenizer.encode(context))
    assert rows_read[0] == (1, context_len)  # the context, once
    assert rows_read[1][0] == len(candidates) and rows_read[1][1] < context_len  # the candidates' own tokens
    monkeypatch.undo()
    one_by_one = [loglikelihood(model, tokenizer, [(context, c)], batch_size=1)[0] for c in candidates]
    for (a, ga), (b, gb) in zip(shared, one_by_one, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_loglikelihood_does_not_depend_on_the_batch_size(ours):
    model, tokenizer = ours
    requests = [(LINES[i][: 30 + 7 * i], " " + LINES[i + 1][: 10 + i]) for i in range(9)]
    a = loglikelihood(model, tokenizer, requests, batch_size=1)
    b = loglikelihood(model, tokenizer, requests, batch_size=4)
    for (x, gx), (y, gy) in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=1e-4) and gx == gy


def test_too_long_requests_are_left_truncated_with_one_warning(ours):
    model, _ = ours
    window = model.config.max_position_embeddings
    long_ctx = [2] + list(range(10, 10 + 2 * window))
    with pytest.warns(UserWarning, match=f"1 of 2 requests are longer than the model's {window}-token"):
        (lp, _), _ = loglikelihood_tokens(model, [(long_ctx, [20, 21]), ([2, 5], [6])])
    ((expected, _),) = loglikelihood_tokens(model, [((long_ctx + [20, 21])[-(window + 1) : -2], [20, 21])])
    assert lp == expected


@pytest.mark.parametrize("scoring", ["sum", "mean", "char", "unconditional"])
def test_rank_normalisations(ours, scoring):
    model, tokenizer = ours
    context, candidates = LINES[4][:50], [" oui", " non merci", " peut-être pas"]
    result = rank(model, tokenizer, context, candidates, scoring=scoring)
    raw = [lp for lp, _ in loglikelihood(model, tokenizer, [(context, c) for c in candidates])]
    n_tokens = [len(encode_pair(tokenizer, context, c)[1]) for c in candidates]
    neutral = [lp for lp, _ in loglikelihood(model, tokenizer, [("Answer:", c) for c in candidates])]
    expected = {
        "sum": raw,
        "mean": [lp / n for lp, n in zip(raw, n_tokens, strict=True)],
        "char": [lp / len(c) for lp, c in zip(raw, candidates, strict=True)],
        "unconditional": [a - b for a, b in zip(raw, neutral, strict=True)],
    }[scoring]
    assert result.scores == pytest.approx(expected, abs=1e-4)
    assert result.best == int(np.argmax(expected))


@pytest.mark.reference
@pytest.mark.parametrize(("context_length", "stride"), [(64, 32), (48, 48), (64, 17), (1000, 500)])
def test_perplexity_equals_the_strided_computation_with_transformers(ours, ref, context_length, stride):
    import torch

    model, tokenizer = ours
    text = " ".join(LINES[:8])
    ids = ref[1].encode(text)
    # Hugging Face's strided loop (docs: "Perplexity of fixed-length models"), summing per-token NLLs.
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context_length, len(ids))
        target_len = end - prev_end
        window = torch.tensor([ids[begin:end]])
        labels = window.clone()
        labels[:, :-target_len] = -100
        with torch.no_grad():
            logits = ref[0](window).logits[0, :-1].double()
        token_nll = torch.nn.functional.cross_entropy(logits, labels[0, 1:], reduction="none")
        nll += token_nll[labels[0, 1:] != -100].sum().item()
        count += int((labels[0, 1:] != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    result = perplexity(model, tokenizer, text, context_length=context_length, stride=stride, batch_size=3)
    assert result.tokens == count
    assert result.nll == pytest.approx(nll, abs=1e-4 * math.ceil(len(ids) / stride))
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-6)


def test_perplexity_scores_every_token_after_the_first_once_when_windows_overlap(ours):
    model, tokenizer = ours
    text = " ".join(LINES[:5])
    n = len(tokenizer.encode(text))
    assert perplexity(model, tokenizer, text, context_length=40, stride=10).tokens == n - 1


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [({"context_length": 1}, "context_length"), ({"stride": 0}, "stride"), ({"stride": 65}, "stride")],
)
def test_perplexity_rejects_bad_windows(ours, kwargs, param):
    model, tokenizer = ours
    with pytest.raises(XGLMError) as error:
        perplexity(model, tokenizer, "some text", **{"context_length": 64, **kwargs})
    assert error.value.param == param


def test_perplexity_of_empty_text_is_an_error(ours):
    with pytest.raises(XGLMError, match="no tokens to score"):
        perplexity(*ours, "  \n ")
