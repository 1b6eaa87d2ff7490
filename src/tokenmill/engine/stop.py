"""Stop strings: find the earliest match, and hold back text that may still become one."""

from __future__ import annotations


class StopMatcher:
    """Matches a request's stop strings against growing text."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)

    def find(self, text: str, new_from: int) -> int:
        """Index of the earliest stop string that ends after `new_from`, or -1."""
        hits = []
        for stop in self.stops:
            at = text.find(stop, max(0, new_from - len(stop) + 1))
            if at >= 0:
                hits.append(at)
        return min(hits, default=-1)

    def holdback(self, text: str) -> int:
        """How many trailing characters of `text` could be the start of a stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
