"""Finding stop strings in text that arrives a piece at a time, in time linear in the text.

Each stop string gets Knuth-Morris-Pratt's failure table once; a `StopMatch` then follows the text
character by character, knowing for each stop string how much of its beginning the text ends with. That
also says how much text to hold back (it may still grow into a stop string) without searching again.
"""

from __future__ import annotations

from collections.abc import Iterable


def _failure(pattern: str) -> list[int]:
    """fail[i]: the length of the longest proper prefix of pattern[: i + 1] that is also its suffix."""
    fail = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    return fail


class StopStrings:
    """Stop strings (empty ones dropped) with their failure tables; build once, share between streams."""

    def __init__(self, stop: Iterable[str] | str | None):
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        self.strings = [s for s in stop if s]
        self.tables = [_failure(s) for s in self.strings]

    def match(self) -> StopMatch:
        return StopMatch(self)


class StopMatch:
    """Where one stream of text stands against its stop strings."""

    def __init__(self, stops: StopStrings):
        self.stops = stops
        self.matched = [0] * len(stops.strings)  # how much of each stop string the text ends with

    def feed(self, text: str) -> int | None:
        """Read `text`; where in `text` the first stop string completed in it begins (negative when it
        began in earlier text), or None. Characters after its end are not read."""
        strings, tables, matched = self.stops.strings, self.stops.tables, self.matched
        for position, char in enumerate(text):
            for j, pattern in enumerate(strings):
                k = matched[j]
                while k and char != pattern[k]:
                    k = tables[j][k - 1]
                if char == pattern[k]:
                    k += 1
                if k == len(pattern):
                    matched[j] = 0
                    return position + 1 - k
                matched[j] = k
        return None

    @property
    def held(self) -> int:
        """How many characters at the end of the text read so far may still begin a stop string."""
        return max(self.matched, default=0)
