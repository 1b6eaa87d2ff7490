"""The engine: add_request / step / abort, over a scheduler, a model runner and the sampler."""

from __future__ import annotations

import hashlib
import itertools
import logging
import secrets

import torch

from tokenmill.engine.detokenizer import Detokenizer
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.sampler import SamplingRow, prompt_logprobs, sample
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import PromptGroup, Sequence, finite
from tokenmill.outputs import ChoiceDelta, Logprobs, RequestOutput
from tokenmill.sampling_params import Prompt, SamplingParams
from tokenmill.tokenizer import Tokenizer


log = logging.getLogger(__name__)


def candidate_seed(seed: int | None, candidate: int) -> int:
    """The random stream of candidate j: fixed by (seed, j) when seeded, fresh otherwise."""
    if seed is None:
        return secrets.randbits(63)
    digest = hashlib.sha256(f"{seed}:{candidate}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Engine:
    """Turns requests into completions, one step of the model at a time."""

    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, eos_ids: tuple[int, ...]):
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.scheduler = Scheduler()
        self._requests: dict[str, list[PromptGroup]] = {}
        self._seq_ids = itertools.count()

    def add_request(self, request_id: str, prompts: list[Prompt], params: SamplingParams) -> None:
        """Queue a request: each prompt gets best_of candidate sequences."""
        groups = [self._group(request_id, i, p, params) for i, p in enumerate(prompts)]
        self._requests[request_id] = groups
        for group in groups:
            self.scheduler.add(group)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its caches."""
        groups = self._requests.pop(request_id, [])
        self.scheduler.remove_request(request_id)
        for seq in (s for g in groups for s in g.sequences):
            self.runner.free(seq.seq_id)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def request_ids(self) -> list[str]:
        return list(self._requests)

    def step(self) -> list[RequestOutput]:
        """Prefill one prompt, decode every running sequence, sample, and report."""
        batch = self.scheduler.schedule()
        rows: list[Sequence] = list(batch.decode)
        logits = [self.runner.decode([s.seq_id for s in rows], [s.output_ids[-1] for s in rows])] if rows else []
        started, last, failed = self._start(batch.prefill) if batch.prefill else ([], None, [])
        if started:
            rows += started
            logits.append(last.expand(len(started), -1))  # [n, V], one row per candidate
        if rows:
            self._sample(rows, torch.cat(logits))
        self._retire(rows, started)
        touched = {s.group.request_id for s in rows} | ({batch.prefill.request_id} if batch.prefill else set())
        return failed + [self._output(rid) for rid in touched if rid in self._requests]

    def _start(self, group: PromptGroup) -> tuple[list[Sequence], torch.Tensor | None, list[RequestOutput]]:
        """Prefill a prompt; if that fails (say, out of memory), fail its request only."""
        try:
            return (*self._prefill(group), [])
        except Exception as exc:
            log.exception("prefill of %s failed", group.request_id)
            return [], None, [self.fail(group.request_id, exc)]

    def _retire(self, rows: list[Sequence], started: list[Sequence]) -> None:
        """New sequences join the decode set; finished ones leave it and free their caches."""
        self.scheduler.start(started)
        self.scheduler.retire()
        for seq in rows:
            if seq.finished:
                self.runner.free(seq.seq_id)

    def fail(self, request_id: str, exc: Exception) -> RequestOutput:
        """Abort a request the engine could not serve; its output says so (no internals)."""
        self.abort(request_id)
        message = f"The server failed while generating this completion ({type(exc).__name__})."
        return RequestOutput(request_id, [], 0, 0, finished=True, error=message)

    def _group(self, request_id: str, index: int, prompt: Prompt, params: SamplingParams) -> PromptGroup:
        """A prompt and its candidates, each with its own random stream."""
        echo = ""
        if params.echo:  # the text the echoed tokens spell, which is the client's when it round-trips
            decoded = self.tokenizer.decode(prompt.token_ids[prompt.skip :])
            echo = prompt.text if prompt.text == decoded else decoded
        group = PromptGroup(request_id, index, prompt, params, self.tokenizer.token_text, echo)
        for j in range(params.best_of):
            generator = torch.Generator(device=self.runner.device).manual_seed(candidate_seed(params.seed, j))
            group.sequences.append(Sequence(next(self._seq_ids), group, self.tokenizer.decode, generator))
        return group

    def _prefill(self, group: PromptGroup) -> tuple[list[Sequence], torch.Tensor | None]:
        """Run a prompt once for all its candidates; return those that go on, and the last logits."""
        params, first = group.params, group.sequences[0]
        group.prefilled = True
        scoring = params.echo and params.logprobs is not None
        if params.max_tokens == 0 and not scoring:
            return self._finish_unsampled(group), None
        logits = self._within_vocab(self.runner.prefill(first.seq_id, list(group.prompt.token_ids), all_logits=scoring))
        if scoring:
            group.echo_logprobs = self._echo_logprobs(group.prompt, logits, params.logprobs)
        if params.max_tokens == 0:
            self.runner.free(first.seq_id)
            return self._finish_unsampled(group), None
        for seq in group.sequences[1:]:
            self.runner.fork(first.seq_id, seq.seq_id)
        return group.sequences, logits[-1:]

    @staticmethod
    def _finish_unsampled(group: PromptGroup) -> list[Sequence]:
        """max_tokens=0: nothing is generated (echo alone scores a prompt)."""
        for seq in group.sequences:
            seq.finish("length")
        return []

    def _echo_logprobs(self, prompt: Prompt, logits: torch.Tensor, k: int) -> Logprobs:
        """The echoed prompt tokens with their logprobs; a token with no context before it has none."""
        ids = prompt.token_ids
        scores = [None, *prompt_logprobs(logits, list(ids), k)]  # position i: log p(ids[i] | ids[:i])
        out, detok, offset = Logprobs(), Detokenizer(self.tokenizer.decode), 0
        for token, score in zip(ids[prompt.skip :], scores[prompt.skip :]):
            out.tokens.append(self.tokenizer.token_text(token))
            out.text_offset.append(offset)
            offset += len(detok.add(token))
            out.token_logprobs.append(None if score is None else finite(score[0]))
            out.top_logprobs.append(None if score is None else self._top(token, *score))
        return out

    def _top(self, token: int, logprob: float, top_ids: list[int], top_lps: list[float]) -> dict[str, float]:
        """The top-k alternatives, with the chosen token always among them."""
        top = {self.tokenizer.token_text(t): finite(lp) for t, lp in zip(top_ids, top_lps)}
        top.setdefault(self.tokenizer.token_text(token), finite(logprob))
        return top

    def _within_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [.., V] with the ids past the tokenizer's vocabulary (padding) made impossible."""
        if logits.shape[-1] <= self.tokenizer.vocab_size:
            return logits
        logits = logits.clone()
        logits[..., self.tokenizer.vocab_size :] = float("-inf")
        return logits

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token per row and hand it to its sequence."""
        batch = [SamplingRow(s.params, s.group.prompt.token_ids, s.output_ids, s.generator, self.eos_ids) for s in rows]
        out = sample(self._within_vocab(logits), batch)
        for i, seq in enumerate(rows):
            token, lp, k = out.tokens[i], out.logprobs[i], seq.params.logprobs
            top = None if k is None else self._top(token, lp, out.top_ids[i][:k], out.top_logprobs[i][:k])
            seq.append(token, lp, top, token in self.eos_ids)

    def _output(self, request_id: str) -> RequestOutput:
        """What a request has to report after this step."""
        groups = self._requests[request_id]
        choices = [delta for g in groups for delta in self._deltas(g)]
        finished = all(g.finished for g in groups)
        if finished:
            del self._requests[request_id]
        return RequestOutput(
            request_id,
            choices,
            prompt_tokens=sum(len(g.prompt.token_ids) for g in groups),
            completion_tokens=sum(len(s.output_ids) for g in groups for s in g.sequences),
            finished=finished,
        )

    @staticmethod
    def _deltas(group: PromptGroup) -> list[ChoiceDelta]:
        """Choice deltas of one prompt: as they come, or the best n at the end when best_of > n."""
        n = group.params.n
        if not group.prefilled:
            return []
        if group.params.best_of == n:
            chosen = list(enumerate(group.sequences))
        elif group.finished and not group.released:
            group.released = True
            chosen = list(enumerate(group.best()))
        else:
            return []
        deltas = []
        for j, seq in chosen:
            text, logprobs, finish = seq.take_delta()
            if text or finish or (logprobs is not None and len(logprobs)):
                deltas.append(ChoiceDelta(group.prompt_index * n + j, text, logprobs, finish))
        return deltas
