"""BatchGenerator: rows join and leave between steps, and every row equals its prompt decoded alone."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_xglm import (
    BatchGenerator,
    XGLMError,
    batch_generate,
    generate_step,
    make_logits_processors,
    make_prompt_cache,
    stream_generate,
)
from mlx_xglm.model import masks

PROMPTS = [
    "The quick brown fox",
    "Москва является столицей",
    "敏捷的棕色狐狸",
    "Le renard brun rapide saute par-dessus le chien paresseux. Où est la bibliothèque?",
    "Hello",
]


@pytest.fixture(scope="module")
def prompts(lively):
    _, tokenizer = lively
    return [tokenizer.encode(p) for p in PROMPTS]


def alone(model, ids, max_tokens, **kwargs):
    return [t for t, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens, **kwargs)]


def drain(gen, out=None, steps=None):
    """Call next() until nothing is left (or `steps` times); tokens per uid, finish reasons per uid."""
    out = {} if out is None else out
    n = 0
    while (steps is None or n < steps) and (responses := gen.next()):
        for r in responses:
            out.setdefault(r.uid, []).append((r.token, r.finish_reason))
        n += 1
    return out


def tokens(out, uid):
    return [t for t, _ in out[uid]]


def test_rows_inserted_mid_decode_equal_their_single_prompt_decode(lively, prompts):
    model, _ = lively
    gen = BatchGenerator(model, max_tokens=24)
    first = gen.insert(prompts[:2])
    out = drain(gen, steps=5)
    later = gen.insert(prompts[2:4])
    out = drain(gen, out, steps=7)
    last = gen.insert(prompts[4:])
    out = drain(gen, out)
    for uid, ids in zip(first + later + last, prompts, strict=True):
        assert tokens(out, uid) == alone(model, ids, 24)
        assert out[uid][-1][1] == "length"
    assert gen.next() == []


def test_removed_rows_leave_the_others_unchanged(lively, prompts):
    model, _ = lively
    gen = BatchGenerator(model, max_tokens=20)
    uids = gen.insert(prompts)
    out = drain(gen, steps=4)
    gen.remove([uids[0], uids[3]])
    out = drain(gen, out)
    assert len(out[uids[0]]) == len(out[uids[3]]) == 4
    for uid, ids in zip(uids, prompts, strict=True):
        if uid not in (uids[0], uids[3]):
            assert tokens(out, uid) == alone(model, ids, 20)


def test_rows_stop_on_their_own(lively, prompts):
    model, _ = lively
    expected = alone(model, prompts[1], 12)
    stop = expected[5]
    gen = BatchGenerator(model, stop_tokens={stop})
    uids = gen.insert(prompts[:3], max_tokens=[3, 12, 7])
    out = drain(gen)
    row = out[uids[1]]
    cut = expected.index(stop) + 1
    assert [t for t, _ in row] == expected[:cut] and row[-1][1] == "stop"
    assert [r for _, r in out[uids[1]][:-1]] == [None] * (cut - 1)
    assert len(out[uids[0]]) == 3 and out[uids[0]][-1][1] in ("length", "stop")
    assert len(out[uids[2]]) <= 7


def test_per_row_samplers_and_logits_processors(lively, prompts):
    model, _ = lively

    def least_likely(logprobs):
        return mx.argmin(logprobs, axis=-1)

    penalty = make_logits_processors(repetition_penalty=1.3, repetition_context_size=None)
    gen = BatchGenerator(model, max_tokens=10)
    uids = gen.insert(
        prompts[:3], samplers=[None, least_likely, None], logits_processors=[None, None, penalty]
    )
    out = drain(gen)
    assert tokens(out, uids[0]) == alone(model, prompts[0], 10)
    assert tokens(out, uids[1]) == alone(model, prompts[1], 10, sampler=least_likely)
    assert tokens(out, uids[2]) == alone(model, prompts[2], 10, logits_processors=penalty)
    assert tokens(out, uids[1]) != alone(model, prompts[1], 10)


def test_logprobs_are_the_full_log_softmax_row_of_the_single_decode(lively, prompts):
    model, _ = lively
    gen = BatchGenerator(model, max_tokens=4)
    uids = gen.insert(prompts[:2])
    got = {uid: [] for uid in uids}
    while responses := gen.next():
        for r in responses:
            got[r.uid].append(np.array(r.logprobs))
    single = [np.array(lp) for _, lp in generate_step(mx.array(prompts[1]), model, max_tokens=4)]
    for ours, theirs in zip(got[uids[1]], single, strict=True):
        assert ours.shape == (model.config.vocab_size,)
        assert np.abs(ours - theirs).max() <= 1e-4
        assert abs(np.exp(ours).sum() - 1) <= 1e-4


@pytest.mark.parametrize("max_kv_size", [6, 16])
def test_windowed_rows_equal_their_single_decode(lively, prompts, max_kv_size):
    model, _ = lively
    gen = BatchGenerator(model, max_tokens=30, max_kv_size=max_kv_size, prefill_step_size=5)
    first = gen.insert(prompts[:3])
    out = drain(gen, steps=9)
    later = gen.insert(prompts[3:])
    out = drain(gen, out)
    for uid, ids in zip(first + later, prompts, strict=True):
        assert tokens(out, uid) == alone(model, ids, 30, max_kv_size=max_kv_size)


def test_batch_generate_with_max_kv_size_equals_generate(lively):
    model, tokenizer = lively
    result = batch_generate(model, tokenizer, PROMPTS, max_tokens=30, max_kv_size=12)
    for prompt, ids, text in zip(PROMPTS, result.token_ids, result.texts, strict=True):
        single = list(stream_generate(model, tokenizer, prompt, max_tokens=30, max_kv_size=12))
        assert ids == [r.token for r in single]
        assert text == "".join(r.text for r in single)


def test_batch_generate_continues_a_shared_prompt_cache_without_changing_it(lively):
    model, tokenizer = lively
    prefix = tokenizer.encode("Le renard brun rapide")
    cache = make_prompt_cache(model)
    assert list(generate_step(mx.array(prefix), model, max_tokens=0, prompt_cache=cache)) == []
    rests = [" saute par-dessus", " Москва"]
    result = batch_generate(model, tokenizer, rests, max_tokens=12, prompt_cache=cache)
    assert cache[0].offset == len(prefix)
    for rest, ids in zip(rests, result.token_ids, strict=True):
        whole = prefix + tokenizer.encode(rest, add_special_tokens=False)
        assert ids == alone(model, whole, 12)


def test_insert_continues_each_row_from_its_own_cache(lively, prompts):
    model, _ = lively
    caches = []
    for ids in prompts[:2]:
        cache = make_prompt_cache(model)
        list(generate_step(mx.array(ids[:-2]), model, max_tokens=0, prompt_cache=cache))
        caches.append(cache)
    gen = BatchGenerator(model, max_tokens=10)
    uids = gen.insert([p[-2:] for p in prompts[:2]] + [prompts[2]], caches=caches + [None])
    out = drain(gen)
    for uid, ids in zip(uids, prompts, strict=False):
        assert tokens(out, uid) == alone(model, ids, 10)


def test_completion_batch_size_bounds_the_rows_decoding_together(lively, prompts):
    model, _ = lively
    gen = BatchGenerator(model, max_tokens=6, completion_batch_size=2, prefill_batch_size=1)
    uids = gen.insert(prompts)
    out, widest = {}, 0
    while responses := gen.next():
        widest = max(widest, len(responses))
        for r in responses:
            out.setdefault(r.uid, []).append((r.token, r.finish_reason))
    assert widest == 2
    for uid, ids in zip(uids, prompts, strict=True):
        assert tokens(out, uid) == alone(model, ids, 6)
    stats = gen.stats()
    assert stats.generation_tokens == 6 * len(prompts)
    assert stats.prompt_tokens == sum(len(p) for p in prompts)


def test_decoding_reads_no_position_back_from_the_device(lively, prompts, monkeypatch):
    model, _ = lively

    def refuse(ids):
        raise AssertionError("a position was read back from the device")

    monkeypatch.setattr(masks.Positions, "given", staticmethod(refuse))
    gen = BatchGenerator(model, max_tokens=70)
    gen.insert(prompts[:2])
    drain(gen, steps=3)
    gen.insert(prompts[2:])
    out = drain(gen)
    # 70 tokens after the longest prompt run past max_position_embeddings: the table grew from host sizes.
    assert max(len(v) for v in out.values()) == 70


@pytest.mark.parametrize(
    ("kwargs", "insert", "param"),
    [
        ({"completion_batch_size": 0}, None, "completion_batch_size"),
        ({"prefill_step_size": 0}, None, "prefill_step_size"),
        ({"max_kv_size": 0}, None, "max_kv_size"),
        ({}, {"prompts": [[]]}, "prompts"),
        ({}, {"prompts": [[2, 5]], "max_tokens": 0}, "max_tokens"),
        ({}, {"prompts": [[2, 5], [2, 6]], "samplers": [None]}, "samplers"),
    ],
)
def test_bad_arguments_are_errors_naming_the_parameter(lively, kwargs, insert, param):
    model, _ = lively
    with pytest.raises(XGLMError, match=param) as error:
        BatchGenerator(model, **kwargs).insert(**(insert or {"prompts": [[2]]}))
    assert error.value.param == param


def test_a_prompt_cache_must_have_the_generators_window(lively):
    model, _ = lively
    gen = BatchGenerator(model, max_kv_size=16)
    with pytest.raises(XGLMError, match="max_kv_size") as error:
        gen.insert([[2, 5]], caches=[make_prompt_cache(model, max_kv_size=8)])
    assert error.value.param == "caches"
    assert gen.insert([[2, 5]], caches=[make_prompt_cache(model, max_kv_size=16)]) == [0]
