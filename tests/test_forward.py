"""model.forward(...): transformers' documented XGLMModel / XGLMForCausalLM options, number for number."""

import mlx.core as mx
import numpy as np
import pytest
from reference import reference_model

from mlx_xglm import XGLMCausalLMOutput, XGLMError, XGLMModelOutput, load

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Привет мир", "東京は日本の首都です。"]


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load(tiny_checkpoint)


@pytest.fixture(scope="module")
def ref(tiny_checkpoint, transformers):
    return reference_model(tiny_checkpoint)


def run_ref(ref, **kwargs):
    import torch

    tensors = {k: torch.tensor(np.array(v)) if v is not None else None for k, v in kwargs.items()}
    with torch.no_grad():
        return ref(**tensors)


def left_padded(tokenizer, texts=TEXTS):
    enc = tokenizer(texts, padding=True, padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


def max_diff(ours, theirs) -> float:
    return float(np.abs(np.array(ours, dtype=np.float32) - theirs.float().numpy()).max())


@pytest.mark.reference
def test_loss_matches_reference(loaded, ref):
    model, tokenizer = loaded
    ids = tokenizer.encode(TEXTS[0])
    out = model.forward(input_ids=[ids], labels=[ids])
    expected = run_ref(ref, input_ids=[ids], labels=[ids]).loss.item()
    assert isinstance(out, XGLMCausalLMOutput) and out.loss.shape == ()
    assert abs(out.loss.item() - expected) <= 1e-5 * abs(expected)


@pytest.mark.reference
def test_loss_ignores_minus_100_over_a_padded_batch_like_reference(loaded, ref):
    model, tokenizer = loaded
    ids, mask = left_padded(tokenizer)
    labels = np.where(np.array(mask, bool), ids, -100)
    # A left-padded row's first token would be scored from the pad before it, whose output means nothing
    # (and differs between implementations): leave it out, as one should in practice.
    first_real = np.argmax(np.array(mask), axis=1)
    labels[np.arange(len(ids)), first_real] = -100
    labels[0, -2] = -100
    positions = (np.cumsum(mask, axis=1) - 1).clip(min=0)
    out = model.forward(input_ids=ids, attention_mask=mask, labels=labels)
    expected = run_ref(ref, input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels)
    assert abs(out.loss.item() - expected.loss.item()) <= 1e-5 * abs(expected.loss.item())


@pytest.mark.reference
def test_loss_with_num_items_in_batch_matches_reference(loaded, ref):
    model, tokenizer = loaded
    ids = tokenizer.encode(TEXTS[1])
    ours = model.forward(input_ids=[ids], labels=[ids], num_items_in_batch=40).loss.item()
    import torch

    with torch.no_grad():
        expected = ref(torch.tensor([ids]), labels=torch.tensor([ids]), num_items_in_batch=40).loss.item()
    assert abs(ours - expected) <= 1e-5 * abs(expected)


@pytest.mark.reference
def test_hidden_states_match_reference(loaded, ref):
    model, tokenizer = loaded
    ids = [tokenizer.encode(TEXTS[0])]
    out = model.forward(input_ids=ids, output_hidden_states=True)
    expected = run_ref(ref, input_ids=ids, output_hidden_states=True).hidden_states
    assert len(out.hidden_states) == len(expected) == model.config.num_layers + 1
    for ours, theirs in zip(out.hidden_states, expected, strict=True):
        assert max_diff(ours, theirs) <= 1e-4


@pytest.mark.reference
def test_attentions_match_reference(loaded, ref):
    model, tokenizer = loaded
    ids = [tokenizer.encode(TEXTS[2])]
    out = model.forward(input_ids=ids, output_attentions=True)
    expected = run_ref(ref, input_ids=ids, output_attentions=True)
    heads, length = model.config.attention_heads, len(ids[0])
    assert len(out.attentions) == len(expected.attentions) == model.config.num_layers
    for ours, theirs in zip(out.attentions, expected.attentions, strict=True):
        assert ours.shape == (1, heads, length, length)
        assert max_diff(ours, theirs) <= 1e-4
    assert max_diff(out.logits, expected.logits) <= 1e-4


@pytest.mark.reference
def test_head_mask_matches_reference(loaded, ref):
    model, tokenizer = loaded
    ids = [tokenizer.encode(TEXTS[0])]
    head_mask = np.ones((model.config.num_layers, model.config.attention_heads), np.float32)
    head_mask[0, 1] = head_mask[1, 3] = head_mask[1, 0] = 0
    out = model.forward(input_ids=ids, head_mask=head_mask, output_attentions=True)
    expected = run_ref(ref, input_ids=ids, head_mask=head_mask, output_attentions=True)
    assert max_diff(out.logits, expected.logits) <= 1e-4
    assert not np.array(out.attentions[1][:, 3]).any()
    for ours, theirs in zip(out.attentions, expected.attentions, strict=True):
        assert max_diff(ours, theirs) <= 1e-4
    plain = model.forward(input_ids=ids).logits
    assert np.abs(np.array(plain) - np.array(out.logits)).max() > 1e-2


@pytest.mark.reference
def test_inputs_embeds_match_reference(loaded, ref):
    model, tokenizer = loaded
    ids = [tokenizer.encode(TEXTS[1])]
    # transformers' inputs_embeds are the scaled token embeddings, ours too.
    embeds = model.model.embed_tokens(mx.array(ids)) * model.model.embed_scale
    out = model.forward(inputs_embeds=embeds, output_hidden_states=True)
    expected = run_ref(ref, inputs_embeds=embeds, output_hidden_states=True)
    assert max_diff(out.logits, expected.logits) <= 1e-4
    assert np.array_equal(np.array(out.logits), np.array(model.forward(input_ids=ids).logits))


@pytest.mark.reference
def test_position_ids_match_reference(loaded, ref):
    model, tokenizer = loaded
    ids = [tokenizer.encode(TEXTS[0])]
    positions = [[p + 7 for p in range(len(ids[0]))]]
    out = model.forward(input_ids=ids, position_ids=positions, output_hidden_states=True)
    expected = run_ref(ref, input_ids=ids, position_ids=positions, output_hidden_states=True)
    assert max_diff(out.logits, expected.logits) <= 1e-4
    assert max_diff(out.hidden_states[0], expected.hidden_states[0]) <= 1e-4


@pytest.mark.reference
def test_left_padded_batch_matches_reference_at_real_tokens(loaded, ref):
    model, tokenizer = loaded
    ids, mask = left_padded(tokenizer)
    out = model.forward(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    # transformers counts positions over real tokens in generate(), not in a bare forward: pass them.
    positions = (np.cumsum(mask, axis=1) - 1).clip(min=0)
    expected = run_ref(
        ref,
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        output_hidden_states=True,
        output_attentions=True,
    )
    real = np.array(mask, bool)
    assert np.abs(np.array(out.logits)[real] - expected.logits.numpy()[real]).max() <= 1e-4
    for ours, theirs in zip(out.hidden_states, expected.hidden_states, strict=True):
        assert np.abs(np.array(ours)[real] - theirs.numpy()[real]).max() <= 1e-4
    for ours, theirs in zip(out.attentions, expected.attentions, strict=True):
        rows = real[:, None, :, None] & real[:, None, None, :]
        rows = np.broadcast_to(rows, ours.shape)
        assert np.abs(np.array(ours)[rows] - theirs.numpy()[rows]).max() <= 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_unpadded_rows(loaded, side):
    model, tokenizer = loaded
    enc = tokenizer(TEXTS, padding=True, padding_side=side)
    out = model.forward(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        output_hidden_states=True,
        output_attentions=True,
    )
    for row, text in enumerate(TEXTS):
        ids = tokenizer.encode(text)
        alone = model.forward(input_ids=[ids], output_hidden_states=True, output_attentions=True)
        real = np.array(enc["attention_mask"][row], bool)
        assert np.abs(np.array(out.logits[row])[real] - np.array(alone.logits[0])).max() <= 1e-4
        assert (
            np.abs(np.array(out.hidden_states[-1][row])[real] - np.array(alone.hidden_states[-1][0])).max()
            <= 1e-4
        )
        probs = np.array(out.attentions[0][row])[:, real][:, :, real]
        assert np.abs(probs - np.array(alone.attentions[0][0])).max() <= 1e-5
        assert np.isfinite(np.array(out.logits[row])).all()


def test_cached_padded_decoding_equals_full_forward(loaded):
    model, tokenizer = loaded
    ids, mask = left_padded(tokenizer)
    full = np.array(model.forward(input_ids=ids, attention_mask=mask).logits)
    width = len(ids[0])
    start = width - 3
    out = model.forward(input_ids=[r[:start] for r in ids], attention_mask=[m[:start] for m in mask])
    assert out.cache is not None and out.cache[0].offset == start
    steps = [np.array(out.logits)]
    for t in range(start, width):
        step = model.forward(
            input_ids=[[r[t]] for r in ids], attention_mask=[m[: t + 1] for m in mask], cache=out.cache
        )
        steps.append(np.array(step.logits))
    real = np.array(mask, bool)
    assert np.abs(np.concatenate(steps, axis=1)[real] - full[real]).max() <= 1e-4


def test_eval_forward_equals_the_decoding_path(loaded):
    model, tokenizer = loaded
    ids = mx.array([tokenizer.encode(TEXTS[0])])
    assert np.array_equal(np.array(model.forward(input_ids=ids).logits), np.array(model(ids)))
    bare = model.model.forward(input_ids=ids)
    assert isinstance(bare, XGLMModelOutput)
    assert np.array_equal(np.array(bare.last_hidden_state), np.array(model.model(ids)))


def test_float16_attentions_keep_a_float32_softmax(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint)
    ids, mask = left_padded(tokenizer)
    expected = model.forward(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    model.set_dtype(mx.float16)
    out = model.forward(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert out.attentions[0].dtype == mx.float16 and np.isfinite(np.array(out.logits)).all()
    for ours, full in zip(out.attentions, expected, strict=True):
        assert np.abs(np.array(ours, np.float32) - np.array(full)).max() <= 1e-2


def test_use_cache_false_returns_no_cache(loaded):
    model, _ = loaded
    assert model.forward(input_ids=[[2, 10, 11]], use_cache=False).cache is None
    assert len(model.forward(input_ids=[[2, 10, 11]]).cache) == model.config.num_layers


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of input_ids and inputs_embeds"),
        ({"input_ids": [[2, 5]], "inputs_embeds": mx.zeros((1, 2, 64))}, "exactly one"),
        ({"input_ids": [2, 5]}, "input_ids must have 2 dimensions"),
        ({"input_ids": [[2, 5]], "attention_mask": [[1, 1, 1]]}, "attention_mask has shape"),
        ({"input_ids": [[2, 5]], "head_mask": [[1, 1, 1, 1]]}, "head_mask has shape"),
        ({"input_ids": [[2, 5]], "position_ids": [[0, 1, 2]]}, "position_ids has shape"),
        ({"input_ids": [[2, 5]], "labels": [[2, 5, 6]]}, "labels has shape"),
        ({"input_ids": [[2, 5]], "labels": [[2, 100000]]}, "labels hold 100000"),
    ],
)
def test_bad_arguments_are_clear_errors(loaded, kwargs, message):
    model, _ = loaded
    with pytest.raises(XGLMError, match=message):
        model.forward(**kwargs)


def test_attention_mask_must_cover_cached_positions(loaded):
    model, _ = loaded
    out = model.forward(input_ids=[[2, 10, 11]])
    with pytest.raises(XGLMError, match=r"cover the cached and the new positions: \(1, 4\)"):
        model.forward(input_ids=[[12]], attention_mask=[[1]], cache=out.cache)


def test_loss_with_every_label_ignored_is_nan_like_torch(loaded):
    model, _ = loaded
    assert np.isnan(model.forward(input_ids=[[2, 10, 11]], labels=[[-100, -100, -100]]).loss.item())
