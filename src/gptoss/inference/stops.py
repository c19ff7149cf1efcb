"""Stop strings, found in text that arrives a piece at a time, in time linear in the text.

Each stop string runs a Knuth-Morris-Pratt matcher over the characters as they arrive, so a token's
check costs its own characters times the number of stop strings, however long the text or the stop
strings grow (searching the whole text again per token is quadratic). The matchers' states also say
how much of the text's tail could still begin a stop string: a stream holds that tail back until
it is known not to be one.
"""

from __future__ import annotations

from collections.abc import Sequence


def _failure(pattern: str) -> list[int]:
    """KMP failure table: fail[i] = length of the longest proper border of pattern[: i + 1]."""
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
    """Finds the first stop string in streamed text; `push` releases text that cannot be part of one.

    (No library offers an incremental multi-pattern matcher with hold-back on str; these lines do.)
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)  # characters of each stop string matched so far
        self.pending = ""  # held back: it may begin a stop string
        self.found: str | None = None

    def push(self, text: str) -> tuple[str, str | None]:
        """Text that is safe to release, and the stop string found (text from the stop string on
        is never released; after a find, everything is ignored)."""
        if self.found is not None:
            return "", self.found
        if not self.stops:
            return text, None
        buffer = self.pending + text
        base = len(self.pending)
        for offset, char in enumerate(text):
            for j, stop in enumerate(self.stops):
                k = self._state[j]
                while k and stop[k] != char:
                    k = self._fail[j][k - 1]
                if stop[k] == char:
                    k += 1
                if k == len(stop):  # found: it ends at this character
                    self.found = stop
                    end = base + offset + 1
                    self.pending = ""
                    return buffer[: end - len(stop)], stop
                self._state[j] = k
        keep = max(self._state)
        self.pending = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], None

    def flush(self) -> str:
        """The held-back text (the stream ended, or a boundary no stop string spans)."""
        text, self.pending = self.pending, ""
        self._state = [0] * len(self.stops)
        return text
