"""What the HTTP layer hands the engine: plain, validated sampling settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# A temperature this small already puts all the mass on the top token (a logit gap of 0.001 is
# e^-100 apart); smaller ones underflow to 0 in float32 and would divide 0 by 0.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match: a JSON schema (as JSON text), a regex, choices (a JSON list), GBNF,
    or free text that may end in Hermes-style tool calls ({"calls": schema of one call, "parallel": bool} as JSON)."""

    kind: Literal["json", "regex", "choice", "grammar", "hermes_tools"]
    text: str


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; already validated at the HTTP edge."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: no logprobs; k: the k most likely tokens too
    echo: bool = False
    n: int = 1
    best_of: int | None = None  # None: n
    seed: int | None = None
    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = False  # leave special tokens out of the text (chat replies do)
    grammar: GrammarSpec | None = None  # structured output: only tokens the grammar allows are sampled
    # Extensions beyond OpenAI's request, as vLLM spells them.
    ignore_eos: bool = False
    min_tokens: int = 0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1.0: off

    def __post_init__(self):
        if self.best_of is None:
            object.__setattr__(self, "best_of", self.n)
        if self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be at least n ({self.n})")

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or below GREEDY_BELOW) means the most likely token, always."""
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class Prompt:
    """One prompt as token ids, with the text it came from when the client sent text."""

    token_ids: tuple[int, ...]
    text: str | None = None
    skip: int = 0  # leading tokens the tokenizer added (BOS): context for scoring, not echoed
