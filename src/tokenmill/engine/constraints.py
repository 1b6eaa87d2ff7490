"""Grammar masks over a batch: which tokens each constrained row may sample next, applied in one operation."""

from __future__ import annotations

import torch

BITS = 32  # tokens per int32 word of a mask row


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
