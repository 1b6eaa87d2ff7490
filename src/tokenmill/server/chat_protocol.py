"""OpenAI's CreateChatCompletionRequest and its responses, as pydantic models (the HTTP edge only)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from tokenmill.sampling_params import GrammarSpec, SamplingParams
from tokenmill.server.errors import APIError, clip, from_validation, invalid
from tokenmill.server.protocol import SamplingFields, Strict, Usage, check_collections, check_logit_bias, load_object

ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_KEYS = {
    "system": {"role", "content", "name"},
    "developer": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "tool_calls", "refusal"},
    "tool": {"role", "content", "tool_call_id"},
}
TEXT_PART_KEYS = {"type", "text", "prompt_cache_breakpoint"}

# Fields that would change what the model produces in ways tokenmill cannot yet honour: refused, never ignored.
UNSUPPORTED = (
    "functions",
    "function_call",
    "audio",
    "prediction",
    "web_search_options",
    "reasoning_effort",
    "verbosity",
    "moderation",
)


class ChatStreamOptions(BaseModel):
    model_config = Strict
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # accepted; tokenmill adds no obfuscation field


class TextPart(BaseModel):
    model_config = Strict
    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = None  # accepted; steers OpenAI's cache only


class ToolCallFunction(BaseModel):
    model_config = Strict
    name: str
    arguments: str  # JSON


class ToolCall(BaseModel):
    model_config = Strict
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class InstructionMessage(BaseModel):
    model_config = Strict
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(BaseModel):
    model_config = Strict
    role: Literal["user"]
    content: str | list[TextPart]
    name: str | None = None


class AssistantMessage(BaseModel):
    model_config = Strict
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None


class ToolMessage(BaseModel):
    model_config = Strict
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


class FunctionDefinition(BaseModel):
    model_config = Strict
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: no arguments
    strict: bool | None = None  # enforced either way


class Tool(BaseModel):
    model_config = Strict
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = Strict
    name: str


class NamedToolChoice(BaseModel):
    model_config = Strict
    type: Literal["function"]
    function: NamedFunction


# The messages' shapes, for the OpenAPI description; parse_messages checks them by hand, for errors
# that name `messages[i].field` (pydantic's union errors name every branch instead).
Message = Annotated[InstructionMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


def template_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """A parsed request's messages as they are: the plain dicts parse_messages made, put in place of the models."""
    return cast("list[dict[str, Any]]", messages)


class ChatCompletionRequest(SamplingFields):
    """The request body as OpenAI documents it; `messages` are checked by hand (see parse_messages)."""

    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens; both work
    max_completion_tokens: int | None = None
    n: int | None = Field(1, ge=1, le=128)
    stream_options: ChatStreamOptions | None = None
    response_format: dict[str, Any] | None = None  # text, json_object or json_schema: see server/structured.py
    modalities: list[Literal["text", "audio"]] | None = None  # only ["text"]
    tools: list[Tool] | None = Field(None, min_length=1, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # with 'auto': several calls (default) or at most one; a forced call is always one

    # Accepted, with no effect: they steer OpenAI's own service, not the text.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = Field(None, max_length=64)

    # --- Extensions (vLLM's names). Not part of OpenAI's API. ---
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def n_(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def token_limit(self) -> int | None:
        """The reply's token limit as given (None: up to the end of the context)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def top_k_logprobs(self) -> int | None:
        """How many alternatives each token's logprobs carry (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def forced_tools(self) -> list[FunctionDefinition]:
        """The functions the reply must call one of ('required', or the one named); empty: a text reply."""
        if not self.tools or self.tool_choice in (None, "none", "auto"):
            return []
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            return [t.function for t in self.tools if t.function.name == name]
        return [t.function for t in self.tools]

    @property
    def auto_tools(self) -> bool:
        """The model chooses: a text reply, or calls to the tools in its own format ('auto', the default once tools are given)."""
        return bool(self.tools) and self.tool_choice in (None, "auto")

    def template_tools(self) -> list[dict] | None:
        """The tools as chat templates take them (transformers' shape), or None."""
        if not self.tools:
            return None
        return [{"type": "function", "function": t.function.model_dump(exclude_none=True, exclude={"strict"})} for t in self.tools]

    def echo_text(self) -> str:
        """echo: the last message's text, when it is the assistant's (the reply continues it)."""
        last = template_messages(self.messages)[-1]
        if not self.echo or last["role"] != "assistant":
            return ""
        return last["content"] or ""


FIELDS = set(ChatCompletionRequest.model_fields) | set(UNSUPPORTED)
PLACEHOLDER_MESSAGE = {"role": "user", "content": ""}  # stands in for the messages, already checked, while pydantic checks the rest


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Validate a chat request body, or raise the 400 that names what is wrong."""
    data = load_object(body, "'model' and 'messages'")
    check_collections(data, FIELDS, set(ChatStreamOptions.model_fields))
    refuse_unsupported(data)
    data = {k: v for k, v in data.items() if k not in UNSUPPORTED}  # what is left of them is null
    messages = parse_messages(data["messages"]) if "messages" in data else None
    try:
        request = ChatCompletionRequest.model_validate({**data, "messages": [PLACEHOLDER_MESSAGE]} if messages is not None else data)
    except ValidationError as exc:
        raise from_validation(exc) from None
    assert messages is not None  # without them, validation has failed above
    request.messages = cast("list[Message]", messages)  # plain dicts from here on, as the chat template takes them (see template_messages)
    check_chat_request(request)
    return request


def unsupported(param: str, why: str = "") -> APIError:
    """OpenAI's answer to a parameter the model cannot take."""
    return invalid(f"Unsupported parameter: '{param}' is not supported with this model{why}.", param, code="unsupported_parameter")


def refuse_unsupported(data: dict) -> None:
    """Fields tokenmill cannot honour yet are a 400, so that no client gets text it did not ask for."""
    for name in UNSUPPORTED:
        if data.get(name) is not None:
            raise unsupported(name)
    tools = data.get("tools")
    if isinstance(tools, list) and any(isinstance(t, dict) and t.get("type") == "custom" for t in tools):
        raise unsupported("tools", " (custom tools: only function tools are served)")
    modalities = data.get("modalities")
    if isinstance(modalities, list) and "audio" in modalities:
        raise unsupported("modalities", " (audio: this model writes text only)")


def parse_messages(value) -> list[dict]:
    """The conversation as the chat template takes it: developer read as system, text parts joined."""
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty array of messages.", "messages")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(value)]


def _message(message, where: str) -> dict:
    """One message, checked field by field; errors name `messages[i].field`."""
    if not isinstance(message, dict):
        raise invalid(f"Invalid type for '{where}': expected an object with 'role' and 'content'.", where)
    role = message.get("role")
    if role is None:
        raise invalid(f"Missing required parameter: '{where}.role'.", f"{where}.role")
    if role == "function":
        raise unsupported(f"{where}.role", " ('function' messages belong to the deprecated 'functions'; send 'tool' messages)")
    if role not in ROLES:
        raise invalid(f"Invalid value: {clip(repr(role))}. Supported values are: 'system', 'developer', 'user', 'assistant', and 'tool'.", f"{where}.role")
    for key in message:
        if key not in MESSAGE_KEYS[role]:
            if role == "assistant" and key in ("audio", "function_call"):
                raise unsupported(f"{where}.{key}")
            name = clip(f"{where}.{key}")
            raise invalid(f"Unrecognized request argument supplied: {name}", name)
    out = {"role": "system" if role == "developer" else role, "content": _content(message, role, where)}
    for key in ("name", "tool_call_id", "refusal"):
        if key in message and not (isinstance(message[key], str) or (key == "refusal" and message[key] is None)):
            raise invalid(f"Invalid type for '{where}.{key}': expected a string.", f"{where}.{key}")
        if message.get(key) is not None:
            out[key] = message[key]
    if role == "tool" and "tool_call_id" not in message:
        raise invalid(f"Missing required parameter: '{where}.tool_call_id'.", f"{where}.tool_call_id")
    if message.get("tool_calls") is not None:
        out["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
    if out["content"] is None and not out.get("tool_calls"):
        raise invalid(f"Missing required parameter: '{where}.content' (an assistant message needs content or tool_calls).", f"{where}.content")
    return out


def _content(message: dict, role: str, where: str) -> str | None:
    """A message's text: a string, or text parts joined with newlines (vLLM's rule)."""
    if "content" not in message and role != "assistant":
        raise invalid(f"Missing required parameter: '{where}.content'.", f"{where}.content")
    content = message.get("content")
    if isinstance(content, str) or (content is None and role == "assistant"):
        return content
    if not isinstance(content, list) or not content:
        raise invalid(f"Invalid type for '{where}.content': expected a string or a non-empty array of text parts.", f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            if isinstance(kind, str):
                raise invalid(f"Content parts of type {clip(repr(kind))} are not supported: this model reads text only.", at)
            raise invalid(f"Invalid value for '{at}': expected an object with 'type': 'text' and 'text'.", at)
        extra = next((k for k in part if k not in TEXT_PART_KEYS), None)
        if extra is not None:
            raise invalid(f"Unrecognized request argument supplied: {clip(f'{at}.{extra}')}", clip(f"{at}.{extra}"))
        if not isinstance(part.get("text"), str):
            raise invalid(f"Invalid type for '{at}.text': expected a string.", f"{at}.text")
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_calls(calls, where: str) -> list[dict]:
    """An assistant's earlier tool calls, with JSON arguments parsed for templates that iterate them."""
    if not isinstance(calls, list):
        raise invalid(f"Invalid type for '{where}': expected an array of tool calls.", where)
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not (
            isinstance(function, dict)
            and isinstance(call.get("id"), str)
            and call.get("type", "function") == "function"
            and isinstance(function.get("name"), str)
            and isinstance(function.get("arguments"), str)
        ):
            raise invalid(f'Invalid value for \'{at}\': expected {{"id", "type": "function", "function": {{"name", "arguments"}}}}.', at)
        try:
            arguments = json.loads(function["arguments"])
        except ValueError:
            arguments = function["arguments"]
        out.append({"id": call["id"], "type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


def check_chat_request(r: ChatCompletionRequest) -> None:
    """The rules that tie fields together, which field types alone cannot say."""
    if r.max_tokens is not None and r.max_completion_tokens is not None:
        raise invalid("Send either 'max_tokens' or 'max_completion_tokens' (its newer name), not both.", "max_tokens")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(r, name)
        if value is not None and value < 1:
            raise invalid(
                f"Invalid '{name}': integer below minimum value. Expected a value >= 1, but got {clip(value)} instead.", name, code="integer_below_min_value"
            )
    if r.top_logprobs is not None and not r.logprobs:
        raise invalid("'top_logprobs' is only allowed when 'logprobs' is true.", "top_logprobs")
    if r.stream_options is not None and not r.stream:
        raise invalid("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
    check_tools(r)
    if r.continue_final_message and r.add_generation_prompt:
        raise invalid("'continue_final_message' continues the last message, so it needs 'add_generation_prompt': false.", "continue_final_message")
    check_logit_bias(r.logit_bias)


def check_tools(r: ChatCompletionRequest) -> None:
    """tools and tool_choice that fit together ('auto' also needs the server's parser and template: server/tool_calls.py)."""
    for name in ("tool_choice", "parallel_tool_calls"):
        if getattr(r, name) is not None and not r.tools:
            raise invalid(f"'{name}' is only allowed when 'tools' are specified.", name)
    if not r.tools:
        return
    names = [t.function.name for t in r.tools]
    if len(set(names)) != len(names):
        raise invalid("Each tool needs its own function name.", "tools")
    if isinstance(r.tool_choice, NamedToolChoice) and r.tool_choice.function.name not in names:
        raise invalid(f"'tool_choice' names {clip(repr(r.tool_choice.function.name))}, which is not among the 'tools'.", "tool_choice")


def to_chat_sampling_params(r: ChatCompletionRequest, max_tokens: int, grammar: GrammarSpec | None = None) -> SamplingParams:
    """The engine's view of a chat request; max_tokens is resolved against the prompt's length."""
    return r.sampling_params(max_tokens=max_tokens, logprobs=r.top_k_logprobs, n=r.n_, skip_special_tokens=True, grammar=grammar)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None  # left out unless the reply is a tool call

    @model_serializer(mode="wrap")
    def _drop_no_calls(self, handler):
        return {k: v for k, v in handler(self).items() if k != "tool_calls" or v is not None}


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    """A chat.completion object: the whole reply."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None  # the next piece of the arguments' JSON text

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatDelta(BaseModel):
    """What a stream chunk adds to a choice; fields it does not carry are left out, as OpenAI sends them."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None or (k == "refusal" and self.role)}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """A chat.completion.chunk object: one server-sent event of a streamed reply."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
