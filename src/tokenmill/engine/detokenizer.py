"""Incremental detokenization: text deltas that never split a character."""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 6  # prompt tokens decoded before the first output, so spacing comes out right


class Detokenizer:
    """Turns a growing list of token ids into text deltas.

    Decoding a window [prefix:] and subtracting the text of [prefix:read] keeps tokenizers that
    drop a leading space honest; a window that ends in U+FFFD is an unfinished character and is
    held back until the next token completes it.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], context: Sequence[int] = ()):
        self._decode = decode
        self._ids = list(context[-CONTEXT_TOKENS:]) if context else []
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token_id: int) -> str:
        """Feed one token; return the text it completes (maybe empty)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """The text still held back, whole or not: the sequence has ended."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]
