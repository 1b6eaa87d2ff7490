"""What the engine hands back: text deltas per choice, with logprobs, in plain Python."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]  # why a choice ended: a stop string or EOS, or its token limit


@dataclass
class Logprobs:
    """OpenAI's legacy logprobs object (the first four lists), and the ids behind it; one entry per token.

    Chat's logprobs are built from `token_ids` and `ranked`: the top alternatives by id, in rank order,
    exactly as many as asked (the legacy `top_logprobs` dict adds the chosen token, and merges tokens
    that spell the same text).
    """

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    ranked: list[list[tuple[int, float]] | None] = field(default_factory=list)

    def extend(self, other: Logprobs) -> None:
        """Append another run of tokens after these."""
        for name in LOGPROB_LISTS:
            getattr(self, name).extend(getattr(other, name))

    def slice(self, start: int, stop: int | None = None) -> Logprobs:
        """The entries for tokens start..stop."""
        return Logprobs(*(getattr(self, name)[start:stop] for name in LOGPROB_LISTS))

    def legacy(self) -> dict:
        """The four lists of the completions endpoint's logprobs object."""
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}

    def __len__(self) -> int:
        return len(self.tokens)


LOGPROB_LISTS = ("tokens", "token_logprobs", "top_logprobs", "text_offset", "token_ids", "ranked")


@dataclass
class ChoiceDelta:
    """New text (and its tokens' logprobs) for one choice since the last output."""

    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: FinishReason | None = None  # set once the choice is done


@dataclass
class RequestOutput:
    """One step's news for one request."""

    request_id: str
    choices: list[ChoiceDelta]
    prompt_tokens: int
    completion_tokens: int
    finished: bool = False
    error: str | None = None  # the engine failed this request; the message says why
    error_status: int = 500  # the HTTP status that error answers (503 shutting down, 408 timed out)
    queue_time: float | None = None  # seconds from arrival to first scheduled, on the first output after it


def failure(request_id: str, message: str, status: int = 500) -> RequestOutput:
    """The last output of a request that ends with an error."""
    return RequestOutput(request_id, [], 0, 0, finished=True, error=message, error_status=status)


@dataclass(frozen=True)
class EngineStats:
    """What the engine holds, published after each step for /metrics and admission control."""

    running_requests: int = 0  # requests with a sequence in the running batch
    waiting_requests: int = 0  # requests the engine holds with none running (queued, preempted, paused)
    kv_usage: float = 0.0  # share of KV blocks held by sequences (free cached blocks count as free)
    prefix_hit_tokens: int = 0  # prompt tokens served from the prefix cache, since start
    prefix_queried_tokens: int = 0  # prompt tokens looked up in it, since start
    preemptions: int = 0  # sequences that gave back their blocks to be recomputed, since start


@dataclass(frozen=True)
class ModelInfo:
    """What the loaded model is, for logs, /v1/models and system_fingerprint."""

    name: str  # the served model name
    source: str  # where it was loaded from
    max_model_len: int
    parameters: int
    dtype: str
    device: str
    tokenizer: str = "huggingface"
    max_request_sequences: int = 256  # prompts x best_of in one request: the most the engine runs at once
    kv_cache_dtype: str | None = None  # where it is not the weights' dtype (--kv-cache-dtype): the numbers differ
