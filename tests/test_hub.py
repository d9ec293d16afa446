"""Hub downloads: one rich progress bar of the bytes still to fetch, huggingface_hub's errors passed on."""

import io
import time

import huggingface_hub
import pytest
from huggingface_hub import constants
from rich.console import Console

from mlx_xglm import XGLMError, load
from mlx_xglm.checkpoints.adapters import read_adapter
from mlx_xglm.checkpoints.hub import snapshot

REPO = "facebook/xglm-tiny"


class Sibling:
    def __init__(self, name, size, sha):
        self.rfilename, self.size, self.blob_id = name, size, sha
        self.lfs = None


class Info:
    siblings = [
        Sibling("config.json", 300, "a" * 40),
        Sibling("model.safetensors", 6000, "b" * 40),
        Sibling("flax_model.msgpack", 10**9, "c" * 40),
    ]


@pytest.fixture
def online_hub(monkeypatch, tmp_path):
    """An empty Hub cache in tmp_path, online, with model_info answered locally."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **k: Info())
    return tmp_path / ("models--" + REPO.replace("/", "--")) / "blobs"


def terminal():
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=120), out


def test_download_shows_the_bytes_still_to_fetch(online_hub, monkeypatch, tiny_checkpoint):
    blobs = online_hub
    blobs.mkdir(parents=True)
    (blobs / ("a" * 40)).write_bytes(b"x" * 300)  # config.json is cached already

    def slow_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        partial = blobs / ("b" * 40 + ".incomplete")
        for _ in range(3):
            with partial.open("ab") as f:
                f.write(b"y" * 2000)
            time.sleep(0.25)
        partial.rename(blobs / ("b" * 40))
        return str(tiny_checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", slow_download)
    console, out = terminal()
    path = snapshot(REPO, None, ["config.json", "*.safetensors"], console=console)
    assert path == str(tiny_checkpoint)
    shown = out.getvalue()
    assert f"downloading {REPO}" in shown
    assert "6.0 kB" in shown and "1.0 GB" not in shown  # only the missing, wanted files count
    assert "6.0/6.0 kB" in shown


def test_errors_of_the_download_reach_the_caller(online_hub, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    def missing(repo_id, revision=None, allow_patterns=None, **kwargs):
        raise RepositoryNotFoundError("404 Client Error: Repository Not Found", response=None)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    monkeypatch.setattr("mlx_xglm.checkpoints.hub.sys.stderr.isatty", lambda: True)
    with pytest.raises(XGLMError, match="neither a local folder nor a Hub repository"):
        load(REPO)


def test_no_bar_without_a_terminal(online_hub, monkeypatch, tiny_checkpoint):
    calls = []
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(a) or str(tiny_checkpoint)
    )
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: pytest.fail("asked the Hub"))
    assert snapshot(REPO, None, ["*.json"]) == str(tiny_checkpoint)
    assert calls == [(REPO,)]


@pytest.mark.parametrize("name", ["./adapter", "~/adapter", "a/b/c", "adapter"])
def test_an_adapter_path_that_is_no_folder_and_no_repo_id_is_not_asked_of_the_hub(monkeypatch, name):
    # The adapter's path goes through the same repo-id rule as a model's: "./adapter" is a missing
    # folder, not a Hub repository called "adapter" owned by ".".
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("asked the Hub"))
    with pytest.raises(XGLMError, match="does not exist") as caught:
        read_adapter(name)
    assert caught.value.param == "adapter_path"
