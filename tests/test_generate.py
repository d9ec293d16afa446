"""The decoding loop: parity with transformers' generate, streaming, stop strings, batches, newline mode."""

import re

import mlx.core as mx
import numpy as np
import pytest
from reference import reference_greedy, reference_model

from mlx_xglm import (
    XGLMError,
    batch_generate,
    generate,
    generate_step,
    load,
    make_logits_processors,
    make_prompt_cache,
    make_sampler,
    stream_generate,
)
from mlx_xglm.decoding.generate import TextStream

PROMPTS = [
    "The quick brown fox",
    "Москва является столицей",
    "敏捷的棕色狐狸",
    "Le renard brun rapide saute par-dessus le chien paresseux. Où est la bibliothèque?",
]
# Penalising every token seen (as transformers' repetition_penalty does) keeps the tiny models from
# repeating one token, so these runs see varied, multilingual output.
VARIED = {"repetition_penalty": 1.3, "repetition_context_size": None}


def greedy_ids(model, ids, max_tokens, **processors):
    lp = make_logits_processors(**processors) if processors else None
    out = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens, logits_processors=lp)]
    return out[: out.index(2) + 1] if 2 in out else out


# Greedy parity runs on models whose greedy tokens vary (xglm_fixtures.varied_weights); the seeds are
# picked so every prompt's 48 greedy tokens hold 8 or more distinct ids (9-19 with scaled embeddings,
# 8-13 without), with top-2 logit margins of 0.016 or more, far above float32 noise.
GREEDY_MODELS = {"scaled_embedding": (True, 0), "unscaled_embedding": (False, 3)}


@pytest.fixture(scope="module", params=list(GREEDY_MODELS))
def varied_checkpoint(request, tmp_path_factory, sp_model):
    from xglm_fixtures import build_checkpoint, varied_weights

    scale_embedding, seed = GREEDY_MODELS[request.param]
    weights = varied_weights(scale_embedding, seed)
    folder = tmp_path_factory.mktemp("varied")
    return build_checkpoint(folder, sp_model, weights=weights, scale_embedding=scale_embedding)


@pytest.mark.reference
def test_greedy_ids_equal_transformers_generate(varied_checkpoint, transformers):
    model, tokenizer = load(varied_checkpoint)
    ref = reference_model(varied_checkpoint)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        # 48 new tokens after the longest prompt runs past max_position_embeddings (64).
        ours = greedy_ids(model, ids, 48)
        assert ours == reference_greedy(ref, ids, 48)
        assert len(set(ours)) >= 8


@pytest.mark.reference
def test_repetition_penalty_ids_equal_transformers(varied_checkpoint, transformers):
    import torch

    model, tokenizer = load(varied_checkpoint)
    ref = reference_model(varied_checkpoint)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            out = ref.generate(
                torch.tensor([ids]), max_new_tokens=60, do_sample=False, min_length=0, repetition_penalty=1.3
            )
        expected = out[0].tolist()[len(ids) :]
        ours = greedy_ids(model, ids, 60, **VARIED)
        assert ours == expected
        assert len(set(ours)) >= 8


def test_generation_past_max_position_embeddings_does_not_fail(lively):
    model, tokenizer = lively
    assert model.config.max_position_embeddings == 64
    responses = list(stream_generate(model, tokenizer, PROMPTS[0], max_tokens=150))
    assert len(responses) == 150 and responses[-1].finish_reason == "length"


def test_step_logprobs_equal_uncached_forward(lively):
    model, tokenizer = lively
    ids = tokenizer.encode(PROMPTS[3])
    steps = list(generate_step(mx.array(ids), model, max_tokens=20, prefill_step_size=7))
    tokens = [t for t, _ in steps]
    logits = model(mx.array([ids + tokens]))[0, len(ids) - 1 : -1]
    expected = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    assert np.abs(np.stack([np.array(lp) for _, lp in steps]) - expected).max() <= 1e-4


def test_prefill_step_size_does_not_change_the_output(lively):
    model, tokenizer = lively
    ids = mx.array(tokenizer.encode(PROMPTS[3]))
    runs = [
        [t for t, _ in generate_step(ids, model, max_tokens=20, prefill_step_size=s)] for s in (1, 5, 512)
    ]
    assert runs[0] == runs[1] == runs[2]


def test_prompt_as_text_ids_or_array_gives_the_same_tokens(lively):
    model, tokenizer = lively
    ids = tokenizer.encode(PROMPTS[1])
    runs = [
        [r.token for r in stream_generate(model, tokenizer, p, max_tokens=10)]
        for p in (PROMPTS[1], ids, mx.array(ids))
    ]
    assert runs[0] == runs[1] == runs[2]


def test_a_prompt_cache_continues_a_conversation_without_rereading_it(lively):
    model, tokenizer = lively
    first, second = "Le renard brun", "Où est la bibliothèque?"
    cache = make_prompt_cache(model)
    reply = [r.token for r in stream_generate(model, tokenizer, first, max_tokens=8, prompt_cache=cache)]
    assert cache[0].offset == len(tokenizer.encode(first)) + len(reply)
    follow_up = [
        r.token for r in stream_generate(model, tokenizer, second, max_tokens=12, prompt_cache=cache)
    ]
    history = tokenizer.encode(first) + reply + tokenizer.encode(second, add_special_tokens=False)
    assert follow_up == greedy_ids(model, history, 12)[:12]


def test_stream_reports_mlx_lm_fields(lively):
    model, tokenizer = lively
    responses = list(stream_generate(model, tokenizer, PROMPTS[0], max_tokens=12, **{}))
    prompt_len = len(tokenizer.encode(PROMPTS[0]))
    assert [r.finish_reason for r in responses] == [None] * 11 + ["length"]
    assert [r.generation_tokens for r in responses] == list(range(1, 13))
    last = responses[-1]
    assert last.prompt_tokens == prompt_len and last.prompt_tps > 0 and last.generation_tps > 0
    assert last.peak_memory > 0 and last.logprobs.shape == (model.config.vocab_size,)
    assert isinstance(last.token, int)


def test_streamed_text_equals_decode_on_multilingual_output(lively):
    model, tokenizer = lively
    lp = make_logits_processors(**VARIED)
    for prompt in PROMPTS:
        responses = list(stream_generate(model, tokenizer, prompt, max_tokens=60, logits_processors=lp))
        tokens = [r.token for r in responses]
        text = "".join(r.text for r in responses)
        assert text == tokenizer.decode(tokens, skip_special_tokens=True)
        assert "\ufffd" not in text
    assert re.search(r"[^\x00-\x7f]", text)


def test_stops_at_eos_without_showing_it(lively):
    model, tokenizer = lively
    lp = make_logits_processors(logit_bias={tokenizer.eos_token_id: 1000.0})
    responses = list(stream_generate(model, tokenizer, PROMPTS[0], max_tokens=10, logits_processors=lp))
    assert len(responses) == 1 and responses[0].token == 2
    assert responses[0].finish_reason == "stop" and responses[0].text == ""


def test_stop_string_across_token_boundaries(lively):
    model, tokenizer = lively
    lp = make_logits_processors(**VARIED)
    tokens = [
        r.token for r in stream_generate(model, tokenizer, PROMPTS[0], max_tokens=40, logits_processors=lp)
    ]
    texts = [tokenizer.decode(tokens[: i + 1], skip_special_tokens=True) for i in range(len(tokens))]
    full_text = texts[-1]

    def spanning_stop(k):
        # The last two characters of token k's text and the first two of token k + 1's.
        end = len(texts[k])
        stop = full_text[end - 2 : end + 2]
        grows = len(texts[k]) - len(texts[k - 1]) >= 2 and len(texts[k + 1]) - end >= 2
        return stop if grows and full_text.find(stop) == end - 2 else None

    k, stop = next((k, s) for k in range(5, len(texts) - 1) if (s := spanning_stop(k)))
    responses = list(
        stream_generate(
            model, tokenizer, PROMPTS[0], max_tokens=40, logits_processors=lp, stop=[stop, "never"]
        )
    )
    assert "".join(r.text for r in responses) == full_text[: full_text.index(stop)]
    # It ends on the token that completes the stop string.
    assert responses[-1].finish_reason == "stop" and len(responses) == k + 2


def test_text_is_held_back_while_a_stop_string_may_be_forming(sp_model):
    from mlx_xglm import XGLMTokenizer

    tokenizer = XGLMTokenizer(sp_model)
    ids = tokenizer.encode("the dog is a dog", add_special_tokens=False)
    stream = TextStream(tokenizer, stop=["dog!"])
    out = [stream.add(i) for i in ids]
    # "dog" could still become "dog!": it is only released when the text goes on, or at the end.
    shown = "".join(out)
    assert shown.rstrip().endswith("a") and "dog" in shown
    assert shown + stream.flush() == "the dog is a dog"
    assert stream.finish_reason is None


def test_generate_prints_the_mlx_lm_footer(lively, capsys):
    model, tokenizer = lively
    text = generate(model, tokenizer, PROMPTS[0], max_tokens=5, verbose=True)
    out = capsys.readouterr().out
    assert out.startswith("==========\n" + text + "\n==========\n")
    assert re.search(
        r"\nPrompt: \d+ tokens, \d+\.\d{3} tokens-per-sec\n"
        r"Generation: 5 tokens, \d+\.\d{3} tokens-per-sec\n"
        r"Peak memory: \d+\.\d{3} GB\n$",
        out,
    )


def test_sampled_generation_is_reproducible_with_a_seed(lively):
    model, tokenizer = lively
    sampler = make_sampler(temp=1.0, top_p=0.95)
    runs = []
    for _ in range(2):
        mx.random.seed(3)
        runs.append(generate(model, tokenizer, PROMPTS[0], max_tokens=20, sampler=sampler))
    assert runs[0] == runs[1]


def test_newline_mode_encodes_newlines_as_eos(lively):
    _, tokenizer = lively
    a = tokenizer.encode("one two", add_special_tokens=False)
    b = tokenizer.encode("three", add_special_tokens=False)
    assert tokenizer.encode("one two\nthree", newlines="eos") == [2, *a, 2, *b]
    assert tokenizer.encode("one two\r\n\nthree", newlines="eos") == [2, *a, 2, 2, *b]
    assert tokenizer.encode("one two\nthree") == [
        2,
        *tokenizer.encode("one two three", add_special_tokens=False),
    ]


def test_newline_mode_shows_eos_as_newline_and_ends_on_two(lively):
    model, tokenizer = lively
    eos_always = make_logits_processors(logit_bias={2: 1000.0})
    spaced = list(stream_generate(model, tokenizer, "one\ntwo", max_tokens=10, logits_processors=eos_always))
    lined = list(
        stream_generate(
            model, tokenizer, "one\ntwo", max_tokens=10, logits_processors=eos_always, newlines="eos"
        )
    )
    assert len(spaced) == 1 and len(lined) == 2 and lined[-1].finish_reason == "stop"
    stream = TextStream(tokenizer, newlines="eos")
    words = [tokenizer.encode(w, add_special_tokens=False) for w in ("one", "two")]
    shown = "".join(stream.add(i) for i in [*words[0], 2, *words[1], 2])
    assert shown == "one\ntwo" and stream.finish_reason is None
    assert stream.add(2) == "" and stream.finish_reason == "stop"


@pytest.mark.parametrize("processors", [{}, VARIED])
def test_batch_rows_equal_unbatched_outputs(lively, processors):
    model, tokenizer = lively
    lp = make_logits_processors(**processors) if processors else None
    result = batch_generate(model, tokenizer, PROMPTS, max_tokens=30, logits_processors=lp)
    assert len({len(tokenizer.encode(p)) for p in PROMPTS}) == len(PROMPTS)
    for prompt, text, ids in zip(PROMPTS, result.texts, result.token_ids, strict=True):
        single = list(stream_generate(model, tokenizer, prompt, max_tokens=30, logits_processors=lp))
        assert ids == [r.token for r in single]
        assert text == "".join(r.text for r in single)
    assert result.finish_reasons == ["length"] * len(PROMPTS)
    assert result.stats.generation_tokens == 30 * len(PROMPTS) and result.stats.prompt_tokens > 0


def test_batch_rows_finish_independently(lively):
    model, tokenizer = lively
    lp = make_logits_processors(**VARIED)
    first = generate(model, tokenizer, PROMPTS[0], max_tokens=20, logits_processors=lp)
    stop = first[8:11]
    result = batch_generate(model, tokenizer, PROMPTS, max_tokens=20, logits_processors=lp, stop=stop)
    for prompt, text, ids, reason in zip(
        PROMPTS, result.texts, result.token_ids, result.finish_reasons, strict=True
    ):
        single = list(
            stream_generate(model, tokenizer, prompt, max_tokens=20, logits_processors=lp, stop=stop)
        )
        assert ids == [r.token for r in single] and text == "".join(r.text for r in single)
        assert reason == single[-1].finish_reason
    assert result.finish_reasons[0] == "stop" and len(result.token_ids[0]) < 20
    assert "length" in result.finish_reasons


def test_batch_of_prompts_in_newline_mode(lively):
    model, tokenizer = lively
    prompts = ["one\ntwo", "Le renard\nbrun rapide"]
    result = batch_generate(model, tokenizer, prompts, max_tokens=10, newlines="eos")
    for prompt, ids in zip(prompts, result.token_ids, strict=True):
        assert ids == [
            r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=10, newlines="eos")
        ]


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (lambda model, tokenizer: list(generate_step(mx.array([], mx.int32), model)), "prompt"),
        (lambda model, tokenizer: list(generate_step(mx.array([2]), model, max_tokens=-1)), "max_tokens"),
        (
            lambda model, tokenizer: list(generate_step(mx.array([2]), model, prefill_step_size=0)),
            "prefill_step_size",
        ),
        (lambda model, tokenizer: generate(model, tokenizer, "hi", newlines="crlf"), "newlines"),
        (lambda model, tokenizer: generate(model, tokenizer, "hi", max_kv_size=0), "max_kv_size"),
        (lambda model, tokenizer: batch_generate(model, tokenizer, []), "prompts"),
    ],
)
def test_bad_arguments_are_errors_naming_the_parameter(lively, call, param):
    with pytest.raises(XGLMError, match=param) as error:
        call(*lively)
    assert error.value.param == param
