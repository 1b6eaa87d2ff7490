"""Who runs this step: one waiting prompt is prefilled, every running sequence decodes."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tokenmill.engine.sequence import PromptGroup, Sequence


@dataclass
class Batch:
    """The work of one step."""

    prefill: PromptGroup | None = None
    decode: list[Sequence] = field(default_factory=list)


class Scheduler:
    """First come, first served; a prefill per step keeps running streams moving."""

    def __init__(self):
        self.waiting: deque[PromptGroup] = deque()
        self.running: list[Sequence] = []

    def add(self, group: PromptGroup) -> None:
        self.waiting.append(group)

    def schedule(self) -> Batch:
        """Take the next prompt to prefill and all sequences to decode."""
        prefill = self.waiting.popleft() if self.waiting else None
        return Batch(prefill, list(self.running))

    def start(self, sequences: list[Sequence]) -> None:
        """Prefilled sequences that still have tokens to make join the decode set."""
        self.running += [s for s in sequences if not s.finished]

    def retire(self) -> None:
        """Drop finished sequences from the decode set."""
        self.running = [s for s in self.running if not s.finished]

    def remove_request(self, request_id: str) -> None:
        """Forget a request's waiting prompts and running sequences."""
        self.waiting = deque(g for g in self.waiting if g.request_id != request_id)
        self.running = [s for s in self.running if s.group.request_id != request_id]
