"""OpenAI's CreateCompletionRequest and its responses, as pydantic models (the HTTP edge only)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import from_json

from tokenmill.sampling_params import GrammarSpec, SamplingParams
from tokenmill.server.errors import BAD_JSON, PROMPT_TYPES, APIError, clip, from_validation, invalid

MAX_STOP = 4
Strict = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = Strict
    include_usage: bool | None = None


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one of these."""

    model_config = Strict
    json_: dict[str, Any] | str | None = Field(None, alias="json")  # a JSON schema (`json` would shadow BaseModel.json)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # GBNF, llama.cpp's dialect
    json_object: bool | None = None


class SamplingFields(BaseModel):
    """The fields both endpoints share, with one meaning (OpenAI's types, defaults and bounds)."""

    model_config = Strict

    model: str
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, int] | None = None
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # int64
    stop: str | list[str] | None = None
    stream: bool | None = False
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, ge=0, le=1)
    user: str | None = None

    # --- Extensions (vLLM's names; `vllm bench serve` sends them). Not part of OpenAI's API. ---
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    top_k: int = Field(0, ge=-1, le=2**31 - 1)  # 0 or -1: off
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    structured_outputs: StructuredOutputs | None = None  # the output follows a JSON schema, regex, choice or GBNF grammar
    guided_json: dict[str, Any] | str | None = None  # vLLM's older names for the same
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling_params(self, **specific) -> SamplingParams:
        """The engine's view of the shared fields, defaults resolved, plus the endpoint's own."""
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias={int(k): float(v) for k, v in (self.logit_bias or {}).items()},
            seed=self.seed,
            stop=self.stops,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            top_k=max(self.top_k, 0),
            repetition_penalty=self.repetition_penalty,
            **specific,
        )


class CompletionRequest(SamplingFields):
    """The request body, field for field as OpenAI documents it (types, defaults, bounds)."""

    prompt: str | list[str] | list[int] | list[list[int]] | None
    best_of: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(16, ge=0)
    n: int | None = Field(1, ge=1, le=128)
    stream_options: StreamOptions | None = None
    suffix: str | None = None

    @property
    def n_(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def max_tokens_(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens

    @property
    def best_of_(self) -> int:
        return self.n_ if self.best_of is None else self.best_of

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


def load_object(body: bytes, what: str) -> dict:
    """A request body as a JSON object, or the 400 that says why not; `what` names its required fields."""
    if not body.strip():
        raise invalid(f"The request body is empty; send a JSON object with {what}.")
    try:
        data = from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise invalid(f"{BAD_JSON} Parser: {exc}.") from None
    if not isinstance(data, dict):
        raise invalid(f"The request body must be a JSON object with {what}.")
    return data


def parse_request(body: bytes) -> CompletionRequest:
    """Validate a request body, or raise the 400 that names what is wrong.

    The prompt is checked here in one pass over plain Python objects: pydantic's union validation
    of a 10-million-id array took 11 s and 3 GB. The parsed body costs about 8 bytes per id (40
    past the ids Python caches), a few times the body's own size.
    """
    data = load_object(body, "'model' and 'prompt'")
    check_collections(data, FIELDS, {"include_usage"})
    prompt = _prompt(data.get("prompt", _MISSING))
    try:
        request = CompletionRequest.model_validate({**data, "prompt": None} if prompt is not _MISSING else data)
    except ValidationError as exc:
        raise from_validation(exc) from None
    request.prompt = prompt
    check_request(request)
    return request


_MISSING = object()
FIELDS = set(CompletionRequest.model_fields)


def check_collections(data: dict, fields: set[str], stream_options: set[str]) -> None:
    """Refuse unknown fields and oversized or mistyped collections in one cheap pass, before pydantic.

    pydantic records one error per bad element: 1.5 million ints as `stop` cost it 5 s and 1.6 GB.
    """
    unknown = next((key for key in data if key not in fields), None)
    if unknown is not None:
        raise invalid(f"Unrecognized request argument supplied: {clip(unknown)}", param=clip(unknown))
    options = data.get("stream_options")
    if isinstance(options, dict):
        unknown = next((key for key in options if key not in stream_options), None)
        if unknown is not None:
            name = clip(f"stream_options.{unknown}")
            raise invalid(f"Unrecognized request argument supplied: {name}", param=name)
    stop = data.get("stop")
    if isinstance(stop, list) and not (1 <= len(stop) <= MAX_STOP and all(type(s) is str for s in stop)):
        raise invalid(f"'stop' takes a string or an array of 1 to {MAX_STOP} strings.", "stop")
    bias = data.get("logit_bias")
    if isinstance(bias, dict):
        bad = next((k for k, v in bias.items() if type(v) is not int), None)
        if bad is not None:
            raise invalid(f"Invalid value in 'logit_bias' for token {clip(repr(bad))}: {clip(repr(bias[bad]))} is not an integer.", "logit_bias")


def _prompt(value):
    """A prompt as OpenAI takes it: a string, strings, token ids or arrays of them (else a 400)."""
    if value is None or value is _MISSING or type(value) is str or value == []:
        return value
    if type(value) is list:
        kind = type(value[0])
        if kind is int and all(type(x) is int for x in value):
            return value
        if kind is str and all(type(x) is str for x in value):
            return value
        if kind is list and all(type(x) is list and all(type(i) is int for i in x) for x in value):
            return value
    raise invalid(PROMPT_TYPES, param="prompt")


def check_request(r: CompletionRequest) -> None:
    """The rules that tie fields together, which field types alone cannot say."""
    if isinstance(r.prompt, list) and (not r.prompt or any(isinstance(p, list) and not p for p in r.prompt)):
        raise invalid("'prompt' must not be empty (nor hold an empty token array).", "prompt")
    if r.best_of_ < r.n_:
        raise invalid(f"best_of ({r.best_of_}) must be greater than or equal to n ({r.n_}).", "best_of")
    if r.stream and r.best_of_ > r.n_:
        raise invalid("best_of > n cannot be streamed: the best completions are known only at the end.", "best_of")
    if r.stream_options is not None and not r.stream:
        raise invalid("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
    if r.suffix and r.echo:
        raise invalid("echo cannot be combined with suffix.", "suffix")
    check_logit_bias(r.logit_bias)


def check_logit_bias(bias: dict[str, int] | None) -> None:
    """Keys are token ids, values -100..100."""
    for key, value in (bias or {}).items():
        if not re.fullmatch(r"-?[0-9]{1,18}", key):
            raise invalid(f"Invalid key in 'logit_bias': {clip(repr(key))} is not a token id.", "logit_bias")
        if not -100 <= value <= 100:
            raise invalid(f"Invalid value in 'logit_bias' for token {key}: {clip(str(value))} is outside -100..100.", "logit_bias")


def to_sampling_params(r: CompletionRequest, grammar: GrammarSpec | None = None) -> SamplingParams:
    """The engine's view of a request: defaults resolved, no pydantic."""
    return r.sampling_params(max_tokens=r.max_tokens_, logprobs=r.logprobs, echo=bool(r.echo), n=r.n_, best_of=r.best_of_, grammar=grammar)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    """A text_completion object: the whole response, or one stream chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


__all__ = ["APIError", "Completion", "CompletionRequest", "parse_request", "to_sampling_params"]
