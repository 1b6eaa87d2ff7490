"""Per-sequence state: tokens, text so far, what has been sent, and why it ended."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenmill.engine.detokenizer import Detokenizer
from tokenmill.engine.kv_cache import BlockTable
from tokenmill.engine.stop import StopMatcher
from tokenmill.outputs import FinishReason, Logprobs
from tokenmill.sampling_params import Prompt, SamplingParams

if TYPE_CHECKING:  # torch only for annotations: this module does no tensor work
    import torch

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; a token this unlikely is as good as impossible


def finite(logprob: float) -> float:
    """A logprob JSON can carry."""
    return LOGPROB_FLOOR if math.isnan(logprob) else max(logprob, LOGPROB_FLOOR)


class Sequence:
    """One candidate completion of one prompt, and how much of it the KV cache holds."""

    def __init__(self, seq_id: int, group: PromptGroup, decode, seed_key: int = 0, candidate: int = 0, matcher=None):
        self.seq_id = seq_id
        self.group = group
        self.seed_key = seed_key  # with the position, fixes this candidate's random draws
        self.candidate = candidate  # its index among the prompt's best_of candidates
        self.matcher = matcher  # llguidance's LLMatcher of its grammar, when its output is constrained
        self.table = BlockTable()
        self.num_computed = 0  # leading tokens whose keys and values are in the cache
        self.penalty_counts: torch.Tensor | None = None  # [V] tensors the sampler keeps up to date, when penalties are on
        self.penalty_seen: torch.Tensor | None = None
        self.output_ids: list[int] = []
        self.logprob_sum = 0.0
        self.finish_reason: FinishReason | None = None
        self.text = ""  # generated text so far, stop strings cut off
        self._cut = False  # a stop string cut the text
        self._detok = Detokenizer(decode, group.prompt.token_ids)
        self._stop = StopMatcher(group.params.stop)
        self._records = Logprobs() if group.params.logprobs is not None else None
        self._base = len(group.echo_text)  # generated text starts after the echoed prompt
        self._sent_text = 0
        self._sent_records = 0
        self._sent_echo = False
        self._sent_finish = False

    @property
    def params(self) -> SamplingParams:
        return self.group.params

    @property
    def prompt_len(self) -> int:
        return len(self.group.prompt.token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens known: the prompt and what has been generated."""
        return self.prompt_len + len(self.output_ids)

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output."""
        prompt, p = self.group.prompt.token_ids, self.prompt_len
        return [*prompt[start:stop], *self.output_ids[max(start - p, 0) : max(stop - p, 0)]]

    def next_run(self, budget: int, chunks: bool = False) -> int:
        """Tokens to compute next: a chunk of the prompt, then one position at a time (with `chunks`, what it recomputes at once)."""
        if self.num_computed < self.prompt_len:
            return min(self.prompt_len - self.num_computed, budget)
        left = min(self.num_tokens - self.num_computed, budget)
        return left if chunks else min(left, 1)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def mean_logprob(self) -> float:
        """What best_of ranks candidates by: log probability per generated token."""
        return self.logprob_sum / len(self.output_ids) if self.output_ids else 0.0

    def append(self, token_id: int, logprob: float, ranked: list[tuple[int, float]] | None, is_eos: bool) -> None:
        """Take one sampled token: text, logprobs (ranked: the top alternatives), stop strings, length."""
        self.output_ids.append(token_id)
        self.logprob_sum += logprob
        if is_eos and not self.params.ignore_eos:
            return self.finish("stop")
        start = len(self.text)
        self.text += self._detok.add(token_id)
        if self._records is not None:
            self._record(token_id, logprob, ranked, self._base + start)
        cut = self._stop.find(self.text, start)
        if cut >= 0:
            self.text, self._cut = self.text[:cut], True
            return self.finish("stop")
        if len(self.output_ids) >= self.params.max_tokens:
            self.finish("length")

    def finish(self, reason: FinishReason) -> None:
        """End the sequence; what the detokenizer held back is final, and may hold a stop string."""
        if not self._cut:
            start = len(self.text)
            self.text += self._detok.flush()
            cut = self._stop.find(self.text, start)
            if cut >= 0:
                self.text, self._cut, reason = self.text[:cut], True, "stop"
        self.finish_reason = reason

    def take_delta(self) -> tuple[str, Logprobs | None, FinishReason | None]:
        """Text, logprobs and finish reason that are safe to send now, and mark them sent."""
        limit = len(self.text) if self.finished else len(self.text) - self._stop.holdback(self.text)
        text = self.text[self._sent_text : limit]
        self._sent_text = max(self._sent_text, limit)
        records = self._take_records(limit)
        if not self._sent_echo:
            self._sent_echo = True
            text = self.group.echo_text + text
            if records is not None and self.group.echo_logprobs is not None:
                records = _concat(self.group.echo_logprobs, records)
        finish = self.finish_reason if self.finished and not self._sent_finish else None
        self._sent_finish = self.finished
        return text, records, finish

    def _record(self, token_id: int, logprob: float, ranked: list[tuple[int, float]] | None, offset: int) -> None:
        """Log one token for the logprobs object."""
        assert self._records is not None  # only called when logprobs were asked for
        record_token(self._records, self.group.token_text, token_id, logprob, ranked or [])
        self._records.text_offset.append(offset)

    def _take_records(self, limit: int) -> Logprobs | None:
        """Records of tokens whose text starts before `limit` (all of them once ended uncut)."""
        if self._records is None:
            return None
        offsets = self._records.text_offset
        end = self._sent_records
        if self.finished and not self._cut:
            end = len(offsets)
        else:
            while end < len(offsets) and offsets[end] < self._base + limit:
                end += 1
        taken = self._records.slice(self._sent_records, end)
        self._sent_records = end
        return taken


def record_token(records: Logprobs, token_text, token_id: int, logprob: float, ranked: list[tuple[int, float]]) -> None:
    """Append one token's entries (all but its text offset): the chosen token is always in the legacy top dict."""
    ranked = [(t, finite(lp)) for t, lp in ranked]
    top = {token_text(t): lp for t, lp in ranked}
    top.setdefault(token_text(token_id), finite(logprob))
    records.tokens.append(token_text(token_id))
    records.token_logprobs.append(finite(logprob))
    records.top_logprobs.append(top)
    records.token_ids.append(token_id)
    records.ranked.append(ranked)


def _concat(first: Logprobs, second: Logprobs) -> Logprobs:
    """first followed by second, as a new object."""
    out = Logprobs()
    out.extend(first)
    out.extend(second)
    return out


@dataclass
class PromptGroup:
    """One prompt of a request and its best_of candidates."""

    request_id: str
    prompt_index: int
    prompt: Prompt
    params: SamplingParams
    token_text: object  # Tokenizer.token_text, to name tokens in logprobs
    echo_text: str = ""
    echo_logprobs: Logprobs | None = None
    sequences: list[Sequence] = field(default_factory=list)
    prefilled: bool = False  # before this, nothing is sent (echo logprobs come from the prefill)
    released: bool = False  # best_of > n: the chosen candidates have been sent
    # echo + logprobs: (logprob, top ids, top logprobs) of prompt tokens 1.., gathered chunk by chunk
    prompt_scores: list = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences)

    @property
    def scoring(self) -> bool:
        """echo with logprobs: every prompt position's logits are wanted."""
        return self.params.echo and self.params.logprobs is not None

    def best(self) -> list[Sequence]:
        """The n candidates with the highest mean token logprob, best first."""
        ranked = sorted(self.sequences, key=lambda s: s.mean_logprob, reverse=True)
        return ranked[: self.params.n]
