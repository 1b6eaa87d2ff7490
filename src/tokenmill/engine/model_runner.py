"""The only code that calls the model: prefill and decode, one KV cache per sequence."""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache


class ModelRunner:
    """Runs a transformers causal LM, one batch-1 forward per sequence.

    Batch-1 forwards make every sequence's numbers independent of what else is running, so a
    request's output is the same alone or under load; batching comes with the paged cache.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self._caches: dict[int, DynamicCache] = {}

    @torch.inference_mode()
    def prefill(self, seq_id: int, token_ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """Run a whole prompt; logits for its last position [1, V], or for all of them [P, V]."""
        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([token_ids], device=self.device)  # [1, P]
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=0 if all_logits else 1)
        self._caches[seq_id] = cache
        return out.logits[0]

    def fork(self, src: int, dst: int) -> None:
        """Give `dst` its own copy of `src`'s cache (n and best_of share one prefill)."""
        self._caches[dst] = copy.deepcopy(self._caches[src])

    @torch.inference_mode()
    def decode(self, seq_ids: list[int], tokens: list[int]) -> torch.Tensor:
        """One step for each sequence: logits [B, V] for the token after `tokens`."""
        rows = []
        for seq_id, token in zip(seq_ids, tokens):
            ids = torch.tensor([[token]], device=self.device)  # [1, 1]
            out = self.model(input_ids=ids, past_key_values=self._caches[seq_id], use_cache=True)
            rows.append(out.logits[0, -1])
        return torch.stack(rows)

    def free(self, seq_id: int) -> None:
        """Drop a finished or aborted sequence's cache."""
        self._caches.pop(seq_id, None)

    @property
    def active(self) -> int:
        """How many sequences hold a cache."""
        return len(self._caches)
