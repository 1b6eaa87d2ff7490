"""Stop strings: find the earliest match, and hold back text that may still become one."""

from __future__ import annotations


class StopMatcher:
    """Matches a sequence's stop strings against its growing text (one matcher per sequence)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self._held = [0] * len(self.stops)  # per stop: its longest prefix that ended the text last time
        self._seen = 0  # the text's length last time

    def find(self, text: str, new_from: int) -> int:
        """Index of the earliest stop string that ends after `new_from`, or -1."""
        hits = []
        for stop in self.stops:
            at = text.find(stop, max(0, new_from - len(stop) + 1))
            if at >= 0:
                hits.append(at)
        return min(hits, default=-1)

    def holdback(self, text: str) -> int:
        """How many trailing characters of `text` could be the start of a stop string.

        `text` only grows between calls. A prefix of length k that ends the text now ended it at
        length k - added before, so the scan starts at last time's match plus the added characters,
        not at the stop's length: linear in the output, however long the stop strings are.
        """
        added, self._seen = len(text) - self._seen, len(text)
        for i, stop in enumerate(self.stops):
            upper = min(len(stop) - 1, len(text), self._held[i] + added)
            self._held[i] = next((k for k in range(upper, 0, -1) if text.endswith(stop[:k])), 0)
        return max(self._held, default=0)
