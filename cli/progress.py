"""What `mlx-xglm lora` shows: a live progress bar on a terminal, and report lines that read well in logs.

The bar (stderr, only on a terminal, gone when training ends) shows the step, the last training and
validation losses, tokens/s, the learning rate and peak memory. The report lines go to stdout, in
mlx-lm's wording, so scripts that parse mlx-lm's training logs read ours.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mlx_xglm.tuning import TrainingUpdate

FIELDS = {"loss": "-", "val": "-", "tps": "-", "lr": "-", "mem": "-"}


class TrainingDisplay:
    """The spinner while loading, the bar while training, and the report lines; `quiet` shows none of
    them (the ranks other than 0 of a run under mlx.launch)."""

    def __init__(self, quiet: bool = False):
        self.out = Console(highlight=False, soft_wrap=True, quiet=quiet)
        self.err = Console(stderr=True, highlight=False, quiet=quiet)
        self.progress: Progress | None = None
        self.task = None

    def spinner(self, text: str):
        return self.err.status(text) if self.err.is_terminal and not self.err.quiet else nullcontext()

    def note(self, text: str) -> None:
        self.out.print(text)

    @contextmanager
    def training(self, iters: int):
        """Show the progress bar while the block runs."""
        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]} | val {task.fields[val]} | {task.fields[tps]} tok/s | "
                "lr {task.fields[lr]} | peak {task.fields[mem]} GB"
            ),
            TimeElapsedColumn(),
            console=self.err,
            transient=True,
            disable=not self.err.is_terminal or self.err.quiet,
        )
        try:
            with self.progress:
                self.task = self.progress.add_task("training", total=iters, **FIELDS)
                yield
        finally:
            self.progress = None

    def update(self, update: TrainingUpdate, folder: Path) -> None:
        """Advance the bar, and print a line for reports, validations and saves."""
        it = update.iteration
        if update.kind == "step":
            self._set(completed=it)
        elif update.kind == "train":
            self._set(
                loss=f"{update.train_loss:.3f}",
                tps=f"{update.tokens_per_second:.1f}",
                lr=f"{update.learning_rate:.2e}",
                mem=f"{update.peak_memory:.3f}",
            )
            self.note(
                f"Iter {it}: Train loss {update.train_loss:.3f}, Learning Rate {update.learning_rate:.3e}, "
                f"Tokens/sec {update.tokens_per_second:.3f}, Trained Tokens {update.trained_tokens}, "
                f"Peak mem {update.peak_memory:.3f} GB"
            )
        elif update.kind == "val":
            self._set(val=f"{update.val_loss:.3f}", mem=f"{update.peak_memory:.3f}")
            self.note(f"Iter {it}: Val loss {update.val_loss:.3f}")
        elif update.kind == "save":
            self.note(f"Iter {it}: Saved adapter weights to {folder}")

    def _set(self, **fields) -> None:
        if self.progress is not None:
            self.progress.update(self.task, **fields)
