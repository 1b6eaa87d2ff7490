"""Who runs this step: every running sequence, then waiting ones, under a token budget.

Sequences carry counts, not phases: one whose cache holds fewer tokens than its prompt gets a chunk
of the prompt; one past its prompt gets a single position. A long prompt is prefilled a chunk per
step beside everyone else's decode. When blocks run out, the most recently admitted sequences give
theirs back and wait at the head of the queue to be recomputed: their generated positions one per step,
or, where the model runner computes a generated position the same as a prompt one (generated_as_prompt),
in chunks as a prompt is, after taking back whatever of them the prefix cache still holds.

No request starves another: when every seat (max_num_seqs) is taken and the request at the head of
the queue has nothing running, the request running the most sequences gives up its newest one, so
the newcomer is admitted at the next step (a request with one sequence is never displaced).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

from tokenmill.engine.kv_cache import BlockManager
from tokenmill.engine.sequence import Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    """The limits of one step.

    While any sequence decodes, one prompt advances at most chunk_while_decoding tokens a step, so
    a long prompt arriving mid-run adds a slice to many steps instead of stalling every stream for
    one long step; several prompts' slices still fill the budget, and with nothing decoding a prompt
    takes the whole budget.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 512
    chunk_while_decoding: int = 64


@dataclass
class Scheduled:
    """A sequence and how many of its tokens this step computes."""

    seq: Sequence
    num_tokens: int


@dataclass
class Plan:
    """One step's work, and the block copies (copy on write) to make before it."""

    scheduled: list[Scheduled]
    copies: list[tuple[int, int]]


class Scheduler:
    """First come, first served; running sequences before waiting ones; preemption by recompute."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager, generated_as_prompt: bool = False):
        self.config = config
        self.blocks = blocks
        self.generated_as_prompt = generated_as_prompt
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_first(self, sequences: list[Sequence]) -> None:
        """Queue sequences ahead of everyone waiting (candidates whose prompt is already computed)."""
        self.waiting.extendleft(reversed(sequences))

    def schedule(self) -> Plan:
        """Pick this step's tokens: keep running sequences going, then admit waiting ones."""
        plan, budget = Plan([], []), self.config.max_num_batched_tokens
        self._make_room()
        chunk = self._chunk_limit()
        for seq in list(self.running):
            if budget == 0 or not seq.table.blocks:  # no blocks: preempted by a sequence before it
                continue
            n = seq.next_run(min(budget, chunk), self.generated_as_prompt)
            if n and self._grow(seq, n, plan):
                plan.scheduled.append(Scheduled(seq, n))
                budget -= n
        while self.waiting and budget and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = self._admit(seq, min(budget, chunk), plan)
            if not n:
                break
            self.waiting.popleft()
            self.running.append(seq)
            plan.scheduled.append(Scheduled(seq, n))
            budget -= n
        return plan

    def cacheable(self, seq: Sequence, upto: int) -> int:
        """How many of the sequence's first `upto` positions may be in the prefix cache: generated ones only with generated_as_prompt."""
        return upto if self.generated_as_prompt else min(upto, seq.prompt_len)

    def _chunk_limit(self) -> int:
        """The most tokens one prompt computes this step."""
        if any(s.num_computed >= s.prompt_len for s in self.running):
            return self.config.chunk_while_decoding
        return self.config.max_num_batched_tokens

    def _make_room(self) -> None:
        """Seats are full and the head of the queue runs nothing: take one from the largest request."""
        if len(self.running) < self.config.max_num_seqs or not self.waiting:
            return
        counts = Counter(s.group.request_id for s in self.running)
        if counts[self.waiting[0].group.request_id]:
            return
        request_id, most = counts.most_common(1)[0]
        if most > 1:
            victim = next(s for s in reversed(self.running) if s.group.request_id == request_id)
            self._preempt(victim, behind=1)  # it waits right behind the newcomer

    def pause(self, sequences: list[Sequence]) -> list[Sequence]:
        """Take sequences out of the queue and the batch, blocks given back; returns those taken."""
        taken = [s for s in sequences if s in self.running or s in self.waiting]
        for seq in taken:
            self.finish(seq)
            seq.num_computed = 0
        return taken

    def finish(self, seq: Sequence) -> None:
        """A sequence is done (finished, aborted or failed): it leaves and its blocks are freed."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.table)

    def _grow(self, seq: Sequence, n: int, plan: Plan) -> bool:
        """Blocks for n more tokens of a running sequence, preempting later ones if need be."""
        while True:
            copies = self._allocate(seq, n)
            if copies is not None:
                plan.copies += copies
                return True
            victim = self._idle_holder() or self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False

    def _allocate(self, seq: Sequence, n: int) -> list[tuple[int, int]] | None:
        """Blocks for the sequence's next n tokens (block copies to make), or None when they run out."""
        longest = seq.prompt_len + seq.params.max_tokens - 1  # the last token is sampled, never computed
        return self.blocks.allocate(seq.table, seq.num_computed + n, seq.num_computed, sure_to=seq.prompt_len, may_reach=longest)

    def _idle_holder(self) -> Sequence | None:
        """The last waiting sequence that holds blocks (forked candidates do): the cheapest to take."""
        return next((s for s in reversed(self.waiting) if s.table.blocks), None)

    def _admit(self, seq: Sequence, budget: int, plan: Plan) -> int:
        """Tokens a waiting sequence computes on admission; 0 when its blocks are not there."""
        fresh = seq.num_computed == 0 and not seq.table.blocks
        if fresh and not seq.group.scoring:  # scoring needs every prompt position's logits
            known = self.cacheable(seq, seq.num_tokens)  # a preempted one's generated tokens too, where they are cached
            limit = known - 1  # the last known token is always computed, for its logits
            seq.num_computed = self.blocks.reuse_prefix(seq.table, seq.token_ids(0, known), limit)
        n = seq.next_run(budget, self.generated_as_prompt)
        copies = self._allocate(seq, n) if n else None
        while copies is None and not self.running and (holder := self._idle_holder()) is not None and holder is not seq:
            self._preempt(holder)  # nothing runs: what waiting ones hold is all there is
            copies = self._allocate(seq, n)
        if copies is None:
            if fresh:  # give back the prefix it found, so the blocks stay evictable while it waits
                self.blocks.free(seq.table)
                seq.num_computed = 0
            return 0
        plan.copies += copies
        return n

    def _preempt(self, seq: Sequence, behind: int = 0) -> None:
        """Take a sequence's blocks back; it waits (first in line, or `behind` others, if it ran) and recomputes."""
        if seq in self.running:
            self.running.remove(seq)
            self.waiting.insert(behind, seq)
        self.blocks.free(seq.table)
        seq.num_computed = 0
        self.preemptions += 1
