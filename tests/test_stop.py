"""Stop strings: the earliest match, across token boundaries, and what may be held back."""

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
