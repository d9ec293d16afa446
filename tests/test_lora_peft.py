"""Adapters and fused models against transformers 4.56 + peft: the same numbers both ways."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from lora_fixtures import data_folder, train_adapter
from reference import reference_logits, reference_model

from mlx_xglm import load
from mlx_xglm.tuning import fuse

IDS = [[2, 100, 200, 300, 400, 500, 17, 33, 250, 7], [2, 901, 5, 66, 780, 12, 1000, 44, 3, 9]]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


@pytest.fixture(scope="module")
def our_adapter(tiny_checkpoint, tmp_path_factory):
    """An adapter trained here: the last layer's attention projections and fc1, non-zero after training."""
    data = data_folder(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("ours")
    return train_adapter(
        tiny_checkpoint,
        data,
        out,
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"],
        num_layers=1,
    )


@pytest.fixture(scope="module")
def peft_adapter(tiny_checkpoint, tmp_path_factory, peft, transformers):
    """An adapter made by peft: random non-zero B, per-module rank and alpha, rsLoRA, layer 0 only."""
    import torch

    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "out_proj", "fc2"],
        layers_to_transform=[0],
        rank_pattern={"fc2": 2},
        alpha_pattern={"out_proj": 3},
        use_rslora=True,
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(reference_model(tiny_checkpoint), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("peft")
    model.save_pretrained(out)
    return out


def ours(checkpoint, adapter=None) -> np.ndarray:
    model, _ = load(checkpoint, adapter_path=adapter)
    return np.array(model(mx.array(IDS)))


def theirs(checkpoint, adapter, peft) -> np.ndarray:
    model = peft.PeftModel.from_pretrained(reference_model(checkpoint), adapter).eval()
    return reference_logits(model, IDS)


@pytest.mark.reference
def test_our_adapter_in_peft_gives_our_logits(tiny_checkpoint, our_adapter, peft):
    expected = ours(tiny_checkpoint, our_adapter)
    assert np.abs(expected - ours(tiny_checkpoint)).max() > 1e-2  # the adapter does change the model
    assert np.abs(theirs(tiny_checkpoint, our_adapter, peft) - expected).max() <= TOLERANCE


@pytest.mark.reference
def test_peft_adapter_here_gives_peft_logits(tiny_checkpoint, peft_adapter, peft):
    config = json.loads((peft_adapter / "adapter_config.json").read_text())
    assert config["use_rslora"] and config["rank_pattern"] and config["alpha_pattern"]
    expected = theirs(tiny_checkpoint, peft_adapter, peft)
    assert np.abs(ours(tiny_checkpoint) - expected).max() > 1e-2
    assert np.abs(ours(tiny_checkpoint, peft_adapter) - expected).max() <= TOLERANCE


@pytest.mark.reference
@pytest.mark.parametrize("which", ["our_adapter", "peft_adapter"])
def test_fused_folder_equals_model_and_adapter_in_both_libraries(
    tiny_checkpoint, which, request, tmp_path, peft, transformers
):
    adapter = request.getfixturevalue(which)
    fused = fuse(tiny_checkpoint, adapter, tmp_path / "fused")
    with_adapter = theirs(tiny_checkpoint, adapter, peft)
    assert np.abs(reference_logits(reference_model(fused), IDS) - with_adapter).max() <= TOLERANCE
    assert np.abs(ours(fused) - with_adapter).max() <= TOLERANCE
    assert np.abs(ours(fused) - ours(tiny_checkpoint, adapter)).max() <= TOLERANCE
