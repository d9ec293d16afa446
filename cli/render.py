"""Terminal output: a spinner while waiting, streamed text, and the stats footer.

On a terminal the spinner and the footer use rich. When stdout is a file or a pipe, stdout gets the plain
generated text and nothing else; the footer goes to stderr, and no ANSI codes are written anywhere that is
not a terminal.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext

from rich.console import Console

from mlx_xglm.decoding.generate import stats_lines

RULE = "=" * 10


def footer_lines(response) -> list[str]:
    """The footer of mlx-lm's verbose generate, which users and scripts parse, for a final response."""
    return stats_lines(
        response.prompt_tokens,
        response.prompt_tps,
        response.generation_tokens,
        response.generation_tps,
        response.peak_memory,
    )


def turn_stats(response) -> str:
    """One line of per-turn stats for chat."""
    return (
        f"[prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tokens-per-sec | "
        f"generation: {response.generation_tokens} tokens, {response.generation_tps:.1f} tokens-per-sec | "
        f"peak memory: {response.peak_memory:.3f} GB]"
    )


class Renderer:
    """Where each kind of output goes, decided once from what stdout and stderr are attached to.

    `quiet` drops the spinner and the footer, leaving only the generated text.
    """

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.out = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        self.interactive = self.out.is_terminal
        self._at_line_start = True

    @contextmanager
    def spinner(self, message: str):
        """A transient spinner on stderr while the block runs, when stderr is a terminal."""
        show = self.err.is_terminal and not self.quiet
        with self.err.status(message, spinner="dots") if show else nullcontext():
            yield

    def write(self, text: str) -> None:
        """Generated text, written as is and flushed so it appears as it is made."""
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self._at_line_start = text.endswith("\n")

    def end_line(self) -> None:
        if not self._at_line_start:
            self.write("\n")

    def footer(self, lines: list[str]) -> None:
        """End the text's line, then the stats: on stdout when it is a terminal, otherwise on stderr."""
        self.end_line()
        if self.quiet:
            return
        console = self.out if self.interactive else self.err
        for line in [RULE, *lines]:
            console.print(line, style="dim", markup=False)

    def note(self, line: str) -> None:
        """A dim one-line remark (chat stats, help) on stdout."""
        self.end_line()
        self.out.print(line, style="dim", markup=False)
