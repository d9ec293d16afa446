"""From a local folder or Hub repo id to a checkpoint folder: Hub downloads, shown on a terminal as one rich
progress bar of the bytes still to fetch, and their errors as XGLMError."""

from __future__ import annotations

import fnmatch
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..errors import XGLMError
from ..tokenization.tokenizer import VOCAB_FILE

# What a checkpoint folder needs; everything else in a Hub repository (flax, tf, rust weights) is skipped.
HUB_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    # Every facebook/xglm-* repository ships only this on its main branch.
    "pytorch_model.bin",
    VOCAB_FILE,
    "tokenizer_config.json",
    "special_tokens_map.json",
]


def looks_like_repo_id(name: str) -> bool:
    """True for an "owner/name" that is not a relative or home path: what the Hub would be asked for."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def resolve_model_path(
    path_or_repo: str | Path, revision: str | None = None, allow_patterns: list[str] | None = None
) -> Path:
    """A local checkpoint folder, downloading `path_or_repo` from the Hub when it is a repo id."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        if revision is not None:
            raise XGLMError(
                f"revision {revision!r} applies to Hub repo ids, but {path} is a local folder; drop it",
                param="revision",
            )
        return path
    if path.exists():
        raise XGLMError(f"{path} is a file; pass the checkpoint folder that contains it")
    name = str(path_or_repo)
    if not looks_like_repo_id(name):
        raise XGLMError(f"model folder {name} does not exist")
    return _download(name, revision, allow_patterns or HUB_ALLOW_PATTERNS)


def _download(repo_id: str, revision: str | None, allow_patterns: list[str]) -> Path:
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot(repo_id, revision, allow_patterns))
    except GatedRepoError:
        raise XGLMError(
            f"Hub repository {repo_id} is gated; accept its terms on huggingface.co and log in "
            "with `hf auth login`"
        ) from None
    except RevisionNotFoundError:
        raise XGLMError(
            f"revision {revision!r} not found in Hub repository {repo_id}", param="revision"
        ) from None
    except RepositoryNotFoundError:
        raise XGLMError(f"{repo_id} is neither a local folder nor a Hub repository you can access") from None
    except HFValidationError:
        raise XGLMError(f"model folder {repo_id} does not exist") from None
    except LocalEntryNotFoundError:
        raise XGLMError(
            f"{repo_id} is not in the local Hub cache and the Hub cannot be reached (offline); "
            "download it once while online, or pass a local checkpoint folder"
        ) from None
    except OSError as e:
        raise XGLMError(f"could not download {repo_id}: {e}") from None


def snapshot(
    repo_id: str, revision: str | None, allow_patterns: list[str], console: Console | None = None
) -> str:
    """`snapshot_download` of the files matching `allow_patterns`, returning the snapshot folder.

    On a terminal (or with `console`), the bytes written into the Hub cache are shown as a rich bar in place
    of huggingface_hub's own bars. Errors are huggingface_hub's; the caller turns them into XGLMError.
    """
    from huggingface_hub import constants, snapshot_download

    if console is None and sys.stderr.isatty():
        console = Console(stderr=True)
    total = (
        None
        if console is None or constants.HF_HUB_OFFLINE
        else _bytes_to_fetch(repo_id, revision, allow_patterns)
    )
    if not total:
        return snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns)

    blobs = _blobs_folder(repo_id)
    before = _bytes_in(blobs)
    outcome = {}

    def download():
        try:
            outcome["path"] = snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns)
        except BaseException as e:  # handed to the caller's thread below
            outcome["error"] = e

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with _hub_bars_off(), Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"downloading {repo_id}", total=total)
        worker = threading.Thread(target=download, daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
            progress.update(task, completed=min(total, _bytes_in(blobs) - before))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["path"]


def _bytes_to_fetch(repo_id: str, revision: str | None, allow_patterns: list[str]) -> int | None:
    """Size of the wanted files whose blobs are not cached yet, or None when the Hub cannot say."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception:  # the download that follows reports the real problem (or works without a bar)
        return None
    blobs = _blobs_folder(repo_id)
    total = 0
    for sibling in info.siblings or []:
        if not any(fnmatch.fnmatch(sibling.rfilename, p) for p in allow_patterns):
            continue
        # The cache names each blob by its etag: the LFS sha256, or the git blob id for small files.
        blob = sibling.lfs.sha256 if sibling.lfs else sibling.blob_id
        if not blob or not (blobs / blob).exists():
            total += sibling.size or 0
    return total


def _blobs_folder(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")) / "blobs"


def _bytes_in(folder: Path) -> int:
    """Bytes in the blob folder, partial downloads (`*.incomplete`) included."""
    total = 0
    for file in folder.glob("*") if folder.is_dir() else ():
        try:
            total += file.stat().st_size
        except OSError:  # renamed from .incomplete to its final name while we looked
            continue
    return total


@contextmanager
def _hub_bars_off():
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()
