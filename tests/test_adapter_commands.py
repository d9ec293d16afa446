"""`--adapter-path` on `server`, `adapter_path` on the lm-eval backend: the adapted model is used."""

from __future__ import annotations

import pytest
from lora_fixtures import random_adapter
from xglm_fixtures import ServerProcess

from mlx_xglm import generate, load, loglikelihood

PROMPT = "Bonjour le monde"
PAIRS = [("The cat sat on the", " mat"), ("Der Hund", " bellt laut"), ("Hola,", " ¿cómo estás?")]


@pytest.fixture(scope="module")
def adapter(lively_checkpoint, tmp_path_factory):
    return random_adapter(lively_checkpoint, tmp_path_factory.mktemp("adapter"))


def test_server_completion_uses_the_adapter(lively_checkpoint, adapter):
    openai = pytest.importorskip("openai")
    server = ServerProcess(lively_checkpoint, "--adapter-path", str(adapter))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        text = (
            client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
        )
    finally:
        assert server.stop() == 0
    with_adapter = generate(*load(lively_checkpoint, adapter_path=adapter), PROMPT, max_tokens=12)
    without = generate(*load(lively_checkpoint), PROMPT, max_tokens=12)
    assert text == with_adapter and text != without


def test_lm_eval_backend_applies_adapter_path(lively_checkpoint, adapter):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    import mlx_xglm.evaluation.harness  # noqa: F401 (registers the mlx-xglm backend)

    lm = get_model("mlx-xglm").create_from_arg_string(
        f"pretrained={lively_checkpoint},adapter_path={adapter}", {"batch_size": 2}
    )
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    scores = lm.loglikelihood(requests, disable_tqdm=True)
    expected = loglikelihood(*load(lively_checkpoint, adapter_path=adapter), PAIRS)
    plain = loglikelihood(*load(lively_checkpoint), PAIRS)
    assert [s for s, _ in scores] == pytest.approx([s for s, _ in expected], abs=1e-5)
    assert [s for s, _ in scores] != pytest.approx([s for s, _ in plain], abs=1e-3)
