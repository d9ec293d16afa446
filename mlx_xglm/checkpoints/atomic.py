"""Outputs that appear whole or not at all: build in a temporary place beside the target, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(target: Path, write: Callable[[Path], None], folder: bool = False) -> None:
    """Call `write(temporary)` on a temporary file (or, with `folder`, a folder) beside `target`, then
    rename it onto `target`.

    Readers see the old file or the new one, never a partial one; an error or Ctrl-C while writing leaves
    `target` as it was and removes the temporary. A file replaces an existing `target`; a folder never
    does (the rename fails with an OSError). The temporary's name ends like `target`'s, since
    mx.save_safetensors appends ".safetensors" to other names, and it gets the permissions of a plain
    open() or mkdir() rather than tempfile's private ones.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = f".{target.name}.", f".partial{target.suffix}"
    if folder:
        temporary = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=target.parent)
    else:
        handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
        os.close(handle)
    try:
        write(Path(temporary))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, (0o777 if folder else 0o666) & ~umask)
        if folder:
            os.rename(temporary, target)
        else:
            os.replace(temporary, target)
    finally:
        if os.path.isdir(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
        elif os.path.exists(temporary):
            os.unlink(temporary)
