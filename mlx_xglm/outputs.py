"""Writing outputs safely: built in a hidden place beside their target and moved into position at the end.

Whatever ends the writer, nothing half-written is left at the target: inside `staged_folder` and
`staged_file`, SIGTERM and SIGHUP raise `Interrupted` (a KeyboardInterrupt) as Ctrl-C does, so the cleanup
runs. The hidden name records the writer's pid (`.NAME.<pid>.<random>.partial`), so the next writer of the
same target removes what a killed one (SIGKILL, a power cut) left. What is created gets the user's umask,
like any other file, and an OSError while writing becomes an XGLMError naming the output.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from .errors import XGLMError

SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while an output was being written; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


@contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM and SIGHUP raise `Interrupted`, so `finally` blocks run as they do for Ctrl-C.

    Only signals left at their default action are taken over (a SIGHUP ignored under `nohup` stays
    ignored), and only in the main thread, the one Python delivers signals to.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    taken = [s for s in SIGNALS if signal.getsignal(s) == signal.SIG_DFL]
    for s in taken:
        signal.signal(s, _raise_interrupted)
    try:
        yield
    finally:
        for s in taken:
            signal.signal(s, signal.SIG_DFL)


def output_error(target: Path, error: OSError, param: str | None = None) -> XGLMError:
    """An XGLMError naming the output `target` (not a temporary or source path) and the system's reason."""
    reason = error.strerror or str(error)
    return XGLMError(f"cannot write {target}: {reason}; nothing was written there", param=param)


def _is_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_partials(target: Path) -> None:
    """Remove the hidden partial outputs for `target` whose writing process no longer exists."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"(\d+)\.[0-9a-f]{8}\.partial(\.[^./]+)?")
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _is_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _hidden_name(target: Path, suffix: str = "") -> Path:
    return target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.partial{suffix}"


@contextmanager
def staged_folder(target: str | Path, param: str | None = None) -> Iterator[Path]:
    """Yield a new hidden folder beside `target`; at the end of the block it is renamed to `target`.

    On an error, Ctrl-C, SIGTERM or SIGHUP the folder is removed instead. An existing `target` is never
    written into. `param` is the caller's parameter for `target`, carried by the XGLMErrors raised here.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(target)
        work = _hidden_name(target)
        os.mkdir(work)  # mode 0o777 less the umask, unlike tempfile.mkdtemp's 0o700
    except OSError as e:
        raise output_error(target, e, param) from None
    with signals_as_interrupt():
        try:
            yield work
            if target.exists() or target.is_symlink():
                raise XGLMError(f"{target} appeared while it was being written; the result was discarded")
            os.rename(work, target)
        except OSError as e:
            raise output_error(target, e, param) from None
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)


@contextmanager
def staged_file(target: str | Path, param: str | None = None) -> Iterator[Path]:
    """Yield a new hidden file beside `target` (same suffix); at the end of the block it replaces `target`.

    The folder of `target` is created when missing. On an error, Ctrl-C, SIGTERM or SIGHUP the hidden
    file is removed and `target` is left as it was.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(target)
        work = _hidden_name(target, target.suffix)
        os.close(os.open(work, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # umask applies
    except OSError as e:
        raise output_error(target, e, param) from None
    with signals_as_interrupt():
        try:
            yield work
            os.replace(work, target)
        except OSError as e:
            raise output_error(target, e, param) from None
        finally:
            work.unlink(missing_ok=True)


def save_safetensors(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str]) -> None:
    """`mx.save_safetensors` through a Python file, so a full disk is an OSError like any other write."""
    with open(path, "wb") as f:
        mx.save_safetensors(f, arrays, metadata=metadata)


def check_writable(
    target: str | Path, param: str | None = None, *, folder: bool, need_bytes: int = 0
) -> None:
    """Before long work whose result goes to `target`: XGLMError (naming `param`) if it cannot be written.

    `target` (a folder when `folder`, else a file) must not be the other kind; its nearest existing folder
    must take a new file (a probe is made and removed there), and that disk must have `need_bytes` free.
    Nothing is left behind, so a run refused here has written nothing.
    """
    target = Path(target)
    if target.exists() and target.is_dir() != folder:
        kind = "a folder" if folder else "a file"
        raise XGLMError(f"{target} exists and is not {kind}; choose another path", param=param)
    place = target if folder and target.is_dir() else target.parent
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise XGLMError(f"cannot write {target}: {place} is not a folder", param=param)
    probe = _hidden_name(place / target.name)
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        probe.unlink()
        free = shutil.disk_usage(place).free
    except OSError as e:
        raise output_error(target, e, param) from None
    if free < need_bytes:
        raise XGLMError(
            f"cannot write {target}: {free / 1e6:.1f} MB free on its disk, {need_bytes / 1e6:.1f} MB needed",
            param=param,
        )
