"""Stop strings: the earliest match, across token boundaries, and what may be held back."""

import random

import pytest

from tokenmill.engine.stop import StopMatcher


@pytest.mark.parametrize(
    "stops, text, new_from, expected",
    [
        (("\n",), "abc\ndef", 3, 3),
        (("END",), "abcEN", 3, -1),
        (("END",), "abcEND", 5, 3),  # the match began in earlier text
        (("x", "bc"), "abcx", 2, 1),  # the earliest match wins, not the first stop listed
        (("bc", "abc"), "zabc", 1, 1),
        (("",), "anything", 0, -1),  # empty stop strings never match
        ((), "abc", 0, -1),
    ],
)
def test_find(stops, text, new_from, expected):
    assert StopMatcher(stops).find(text, new_from) == expected


@pytest.mark.parametrize(
    "stops, text, expected",
    [
        (("END",), "abcEN", 2),
        (("END",), "abcE", 1),
        (("END",), "abc", 0),
        (("END", "Nope"), "xEN", 2),
        (("\n\n",), "a\n", 1),
        (("ab",), "", 0),
    ],
)
def test_holdback(stops, text, expected):
    assert StopMatcher(stops).holdback(text) == expected


def test_holdback_follows_growing_text():
    matcher, text, held = StopMatcher(("abcab", "zz")), "", []
    for piece in ["x", "ab", "c", "a", "b", "z", "z"]:
        text += piece
        held.append(matcher.holdback(text))
    # "xabca" holds "abca"; at most len(stop) - 1 is held (a whole stop is find's, not holdback's).
    assert held == [0, 2, 3, 4, 2, 1, 1]


def test_holdback_agrees_with_a_fresh_scan_on_random_text():
    rng = random.Random(0)
    stops = ("abab", "aab", "ba" * 30)
    matcher, text = StopMatcher(stops), ""
    for _ in range(400):
        text += "".join(rng.choice("ab") for _ in range(rng.randint(0, 3)))
        fresh = max((k for s in stops for k in range(min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])), default=0)
        assert matcher.holdback(text) == fresh
