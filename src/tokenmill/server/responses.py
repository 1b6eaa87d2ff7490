"""Engine outputs -> text_completion objects: whole responses and stream chunks."""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import asdict, dataclass, field

from tokenmill import __version__
from tokenmill.outputs import ChoiceDelta, FinishReason, Logprobs, ModelInfo, RequestOutput
from tokenmill.server.protocol import Completion, CompletionChoice, CompletionLogprobs, Usage


def fingerprint(info: ModelInfo) -> str:
    """Changes when the model, its dtype, the KV cache's dtype or tokenmill's version does."""
    key = f"{info.source}|{info.parameters}|{info.dtype}|{__version__}"
    if info.kv_cache_dtype is not None:  # only then: the fingerprints of servers without the option stay as they were
        key += f"|kv={info.kv_cache_dtype}"
    return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def new_id(prefix: str) -> str:
    """A response id: OpenAI's prefix for the object, then a random part."""
    return prefix + uuid.uuid4().hex


@dataclass(frozen=True)
class Header:
    """What every object of one response shares."""

    model: str
    system_fingerprint: str
    id: str = field(default_factory=lambda: new_id("cmpl-"))
    created: int = field(default_factory=lambda: int(time.time()))

    def completion(self, choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(**self.fields(), choices=choices, usage=usage)

    def fields(self) -> dict:
        """id, created, model and system_fingerprint, as every response object carries them."""
        return asdict(self)


def usage_of(output: RequestOutput) -> Usage:
    return Usage(
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
        total_tokens=output.prompt_tokens + output.completion_tokens,
    )


def completion_chunks(header: Header, include_usage: bool):
    """A function from one engine output to the text_completion stream chunks it makes."""

    def chunks(output: RequestOutput) -> list[dict]:
        out = [header.completion([choice_of(d)]).model_dump(exclude=None if include_usage else {"usage"}) for d in output.choices]
        if output.finished and include_usage:
            out.append(header.completion([], usage_of(output)).model_dump())
        return out

    return chunks


def choice_of(delta: ChoiceDelta) -> CompletionChoice:
    """One choice (or its delta) in OpenAI's shape."""
    logprobs = None if delta.logprobs is None else CompletionLogprobs(**delta.logprobs.legacy())
    return CompletionChoice(text=delta.text, index=delta.index, logprobs=logprobs, finish_reason=delta.finish_reason)


class Accumulator:
    """Gathers a request's deltas into whole choices, for a non-streamed response."""

    def __init__(self, choices: int, logprobs: bool):
        self._text: list[list[str]] = [[] for _ in range(choices)]
        self._logprobs = [Logprobs() for _ in range(choices)] if logprobs else None
        self._finish: list[FinishReason | None] = [None] * choices
        self.last: RequestOutput | None = None

    def add(self, output: RequestOutput) -> None:
        self.last = output
        for delta in output.choices:
            self._text[delta.index].append(delta.text)
            if self._logprobs is not None and delta.logprobs is not None:
                self._logprobs[delta.index].extend(delta.logprobs)
            self._finish[delta.index] = delta.finish_reason or self._finish[delta.index]

    def usage(self) -> Usage:
        """The request's token counts, from its last output."""
        assert self.last is not None  # a collected request ends with a finished output
        return usage_of(self.last)

    def deltas(self) -> list[ChoiceDelta]:
        """Each choice whole, as one delta."""
        return [ChoiceDelta(i, "".join(parts), self._logprobs[i] if self._logprobs else None, self._finish[i]) for i, parts in enumerate(self._text)]

    def choices(self) -> list[CompletionChoice]:
        return [choice_of(delta) for delta in self.deltas()]
