"""PrefixCache (an LRU of prompt caches by token sequence); rows with their own caches prefilled together."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_xglm import BatchGenerator, XGLMError, generate_step, make_prompt_cache
from mlx_xglm.decoding.prefix_cache import PrefixCache

TEXTS = [
    "Le renard brun rapide saute par-dessus le chien paresseux. Où est la bibliothèque? " * 3,
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the woods.",
    "Москва является столицей",
]


@pytest.fixture(scope="module")
def prompts(lively):
    _, tokenizer = lively
    return [tokenizer.encode(t) for t in TEXTS]


def alone(model, ids, max_tokens):
    return [t for t, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens)]


def read(model, ids, max_kv_size=None):
    cache = make_prompt_cache(model, max_kv_size)
    assert list(generate_step(mx.array(ids), model, max_tokens=0, prompt_cache=cache)) == []
    return cache


def run(gen, uids):
    """Every row's tokens and first-token log-probabilities, and the finished rows' caches."""
    out = {uid: [] for uid in uids}
    first, caches = {}, {}
    while responses := gen.next():
        for r in responses:
            first.setdefault(r.uid, np.array(r.logprobs))
            out[r.uid].append(r.token)
            if r.finish_reason is not None:
                caches[r.uid] = r.prompt_cache
    return [out[u] for u in uids], [first[u] for u in uids], [caches[u] for u in uids]


def test_rows_with_caches_of_different_lengths_prefill_together_as_one_by_one(lively, prompts):
    model, _ = lively
    # Cached beginnings of 30, 3 and 0 tokens; the rest is 2, 15 and all tokens, read in chunks of 8.
    splits = [30, 3, 0]
    caches = [read(model, p[:s]) if s else None for p, s in zip(prompts, splits, strict=True)]
    rests = [p[s:] for p, s in zip(prompts, splits, strict=True)]
    together = BatchGenerator(model, max_tokens=8, prefill_step_size=8)
    tokens, logprobs, _ = run(together, together.insert(rests, caches=caches))
    single = BatchGenerator(model, max_tokens=8, prefill_step_size=8, prefill_batch_size=1)
    one_tokens, one_logprobs, _ = run(single, single.insert(rests, caches=caches))
    assert tokens == one_tokens
    for ids, row in zip(prompts, tokens, strict=True):
        assert row == alone(model, ids, 8)
    for a, b in zip(logprobs, one_logprobs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert [c[0].offset for c in caches if c] == [30, 3]  # read, not changed


def test_a_finished_rows_cache_continues_its_text(lively, prompts):
    model, _ = lively
    gen = BatchGenerator(model, max_tokens=6)
    tokens, _, caches = run(gen, gen.insert(prompts[1:]))
    for ids, row, cache in zip(prompts[1:], tokens, caches, strict=True):
        assert cache[0].offset == len(ids) + len(row)
        more = BatchGenerator(model, max_tokens=5)
        (cont,), _, _ = run(more, more.insert([[row[-1]]], caches=[[_trimmed(c, 1) for c in cache]]))
        assert row + cont[:4] == alone(model, ids, 10)[: len(row) + 4]


def test_a_finished_rows_cache_keeps_the_generators_window(lively, prompts):
    model, _ = lively
    ids = prompts[0][:40]
    gen = BatchGenerator(model, max_tokens=4, max_kv_size=16)
    (row,), _, (cache,) = run(gen, gen.insert([ids]))
    assert cache[0].offset == len(ids) + 4 and cache[0].max_size == 16
    more = BatchGenerator(model, max_tokens=3, max_kv_size=16)
    (cont,), _, _ = run(more, more.insert([[5, 6]], caches=[cache]))
    whole = [t for t, _ in generate_step(mx.array(ids + row + [5, 6]), model, max_tokens=3, max_kv_size=16)]
    assert cont == whole


def _trimmed(layer, n):
    copy = type(layer).from_state(layer.state, layer.meta_state)
    copy.trim(n)
    return copy


def test_fetch_gives_the_longest_cached_beginning_leaving_a_token(lively, prompts):
    model, _ = lively
    ids = prompts[0]
    prefix_cache = PrefixCache(max_size=4)
    prefix_cache.insert(ids[:10], read(model, ids[:10]))
    prefix_cache.insert(ids[:25], read(model, ids[:25]))
    hit = prefix_cache.fetch(ids[:20] + [5, 6])
    assert hit.length == 20 and hit.cache[0].offset == 20
    assert prefix_cache.fetch(ids[:25]).length == 24  # the whole prompt cached: its last token is read again
    assert prefix_cache.fetch([7] + ids).cache is None
    assert (prefix_cache.hits, prefix_cache.misses) == (2, 1)
    assert len(prefix_cache) == 1  # the 10-token entry is a beginning of the 25-token one


def test_a_fetched_cache_continues_as_the_whole_prompt(lively, prompts):
    model, _ = lively
    ids = prompts[0]
    prefix_cache = PrefixCache()
    prefix_cache.insert(ids[:40], read(model, ids[:40]))
    hit = prefix_cache.fetch(ids[:30] + ids[35:])
    gen = BatchGenerator(model, max_tokens=8)
    (row,), _, _ = run(gen, gen.insert([(ids[:30] + ids[35:])[hit.length :]], caches=[hit.cache]))
    assert row == alone(model, ids[:30] + ids[35:], 8)


def test_least_recently_used_entries_go_first(lively, prompts):
    model, _ = lively
    prefix_cache = PrefixCache(max_size=2)
    for ids in prompts:
        prefix_cache.insert(ids, read(model, ids))
        prefix_cache.fetch(prompts[0] + [4])
    assert len(prefix_cache) == 2
    assert prefix_cache.fetch(prompts[1] + [4]).length == 1  # only the leading </s> every prompt has
    assert prefix_cache.fetch(prompts[2] + [4]).length == len(prompts[2])


def test_the_byte_bound_holds_for_entries_and_memory(lively, prompts):
    model, _ = lively
    one = sum(array.nbytes for layer in read(model, prompts[0]) for array in layer.state)
    prefix_cache = PrefixCache(max_size=100, max_bytes=int(2.5 * one))
    mx.clear_cache()
    before = mx.get_active_memory()
    for i in range(6):
        ids = [4 + i] + prompts[0][1:]
        prefix_cache.insert(ids, read(model, ids))
        assert prefix_cache.nbytes <= prefix_cache.max_bytes
    mx.clear_cache()
    assert len(prefix_cache) == 2
    assert mx.get_active_memory() - before <= prefix_cache.max_bytes
    prefix_cache.insert(prompts[0] * 3, read(model, prompts[0] * 3))  # over the bound alone: not kept
    assert len(prefix_cache) == 2 and prefix_cache.nbytes <= prefix_cache.max_bytes


def test_scores_are_kept_and_given_back_for_the_common_beginning(lively, prompts):
    model, _ = lively
    ids = prompts[0]
    scores = [(-float(i), [(i, -float(i))]) for i in range(1, len(ids))]
    prefix_cache = PrefixCache()
    prefix_cache.insert(ids, read(model, ids[:-1]), scores=scores, top=1)
    hit = prefix_cache.fetch(ids[:20] + [9, 9], top=0)
    assert hit.length == 19 and hit.cache[0].offset == 19
    assert hit.scores == [(lp, []) for lp, _ in scores[:19]]
    assert prefix_cache.fetch(ids, top=1).length == len(ids) - 1
    assert prefix_cache.fetch(ids, top=2).cache is None  # kept one alternative, two asked


def test_sizes_must_be_positive():
    with pytest.raises(XGLMError) as e:
        PrefixCache(max_size=0)
    assert e.value.param == "prompt_cache_size"
    with pytest.raises(XGLMError) as e:
        PrefixCache(max_bytes=0)
    assert e.value.param == "prompt_cache_bytes"
