"""Grammar masks over a batch: which tokens each constrained row may sample next, applied in one operation."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

BITS = 32  # tokens per int32 word of a mask row
T = TypeVar("T")


def grammar_bitmask(matchers: list, vocab: int, grammar_vocab: int, eos_ids: tuple[int, ...]) -> torch.Tensor:
    """[B, ceil(V/32)] int32 bits of the allowed next tokens; a row without a matcher allows every token.

    grammar_vocab: the vocabulary the matchers were built for (V may be larger: embedding padding).

    Every end-of-sequence id is allowed where the grammar accepts (llguidance knows only the
    tokenizer's own EOS); ids past the grammar's vocabulary (embedding padding) never are.
    """
    words = -(-vocab // BITS)
    mask = torch.full((len(matchers), words), -1, dtype=torch.int32)
    for i, matcher in enumerate(matchers):
        if matcher is None:
            continue
        mask[i] = 0
        row = mask[i, : -(-grammar_vocab // BITS)]  # contiguous: a prefix of a row
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        if matcher.is_accepting():
            for token in eos_ids:
                if token < vocab:
                    mask[i, token // BITS] |= _bit(token % BITS)
    return mask


def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits [B, V] with every token a row's mask disallows made impossible."""
    bits = torch.arange(BITS, dtype=torch.int32, device=logits.device)
    allowed = ((mask.to(logits.device)[:, :, None] >> bits) & 1).bool().flatten(1)[:, : logits.shape[-1]]  # [B, V]
    return logits.masked_fill(~allowed, float("-inf"))


def _bit(position: int) -> int:
    """The int32 value with one bit set (bit 31 is the sign)."""
    value = 1 << position
    return value - (1 << BITS) if value >= 1 << (BITS - 1) else value


class Ahead(Generic[T]):
    """Runs a function on a thread of its own (grammar masks while the model's forward runs); result() waits for it.

    llguidance computes a mask in Rust and torch's ops release the GIL, so the two overlap; the
    matchers are touched by nobody else until result() returns.
    """

    def __init__(self, fn: Callable[[], T]):
        self._fn = fn
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tokenmill-masks", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:  # raised again by result(), on the engine's thread
            self._error = exc

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value
