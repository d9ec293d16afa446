"""Opt-in checks against the real facebook/xglm-564M, run when it is already in the local Hub cache."""

import mlx.core as mx
import pytest

REPO = "facebook/xglm-564M"


@pytest.fixture(scope="module")
def real_model():
    from huggingface_hub import snapshot_download

    from mlx_xglm import XGLMError, load

    try:
        snapshot_download(REPO, local_files_only=True)
        model, tokenizer = load(REPO)
        # transformers' own test runs the fp16 checkpoint upcast to float32; so do we.
        model.set_dtype(mx.float32)
        return model, tokenizer
    except (OSError, XGLMError) as e:
        pytest.skip(f"{REPO} is not usable from the local Hub cache: {e}")


@pytest.mark.real_model
def test_real_tokenizer_ids(real_model):
    _, tokenizer = real_model
    assert tokenizer.encode("Hello World!") == [2, 31227, 4447, 35]


@pytest.mark.real_model
def test_real_greedy_ids_match_transformers_test(real_model):
    model, tokenizer = real_model
    ids = tokenizer.encode("The dog")
    assert ids == [2, 268, 9865]
    cache = model.make_cache()
    logits = model(mx.array([ids]), cache=cache)
    while len(ids) < 20:
        token = mx.argmax(logits[:, -1, :], axis=-1).item()
        ids.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    expected = [
        2,
        268,
        9865,
        67,
        11,
        1988,
        57252,
        9865,
        5,
        984,
        67,
        1988,
        213838,
        1658,
        53,
        70446,
        33,
        6657,
        278,
        1581,
    ]
    assert ids == expected
