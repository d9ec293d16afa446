"""A rich progress bar of requests scored, drawn on stderr by rank 0 only."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .distributed import world


@contextmanager
def request_progress(
    description: str, total: int, enabled: bool, group=None
) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; with `enabled` (and on rank 0) it moves a bar of `total` requests.

    Under the launcher rank 0 sees its own share only, so the bar counts that share.
    """
    group = world(group)
    if not enabled or group.rank() != 0 or total == 0:
        yield lambda n: None
        return
    share = -(-total // group.size()) if group.size() > 1 else total
    suffix = f" (rank 0 of {group.size()})" if group.size() > 1 else ""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description + suffix, total=share)
        yield lambda n: bar.advance(task, n)
