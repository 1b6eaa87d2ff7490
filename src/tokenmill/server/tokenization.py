"""POST /tokenize and /detokenize in vLLM's shapes: count and read tokens remotely (the HTTP edge only)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, ValidationError

from tokenmill.server.chat_protocol import PLACEHOLDER_MESSAGE, Message, parse_messages, template_messages
from tokenmill.server.errors import from_validation, invalid
from tokenmill.server.prompts import check_ids, checked, render_chat
from tokenmill.server.protocol import Strict, load_object
from tokenmill.tokenizer import Tokenizer


class TokenizeText(BaseModel):
    """A text prompt; special tokens (a BOS) added as the completions endpoint adds them."""

    model_config = Strict
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChat(BaseModel):
    """A conversation, through the chat template as /v1/chat/completions renders it."""

    model_config = Strict
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # the template writes them
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = Strict
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def parse_tokenize(body: bytes) -> TokenizeText | TokenizeChat:
    """A /tokenize body: `messages` makes it a conversation, else it is a text `prompt`."""
    data = load_object(body, "'prompt' or 'messages'")
    if "messages" not in data:
        return _validated(TokenizeText, data)
    messages = parse_messages(data["messages"])
    request = _validated(TokenizeChat, {**data, "messages": [PLACEHOLDER_MESSAGE]})
    request.messages = messages  # plain dicts, as the chat template takes them
    return request


def parse_detokenize(body: bytes) -> DetokenizeRequest:
    """A /detokenize body; token ids are checked in one pass (pydantic is slow on a million of them)."""
    data = load_object(body, "'tokens'")
    tokens = data.get("tokens")
    if not (type(tokens) is list and all(type(t) is int for t in tokens)):
        raise invalid("'tokens' must be an array of token ids.", "tokens")
    request = _validated(DetokenizeRequest, {**data, "tokens": []})
    request.tokens = tokens
    return request


def tokenize(request: TokenizeText | TokenizeChat, tokenizer: Tokenizer, max_model_len: int) -> TokenizeResponse:
    """The ids a prompt or conversation becomes, as the generation endpoints would see them."""
    if isinstance(request, TokenizeChat):
        messages = template_messages(request.messages)
        text, param = (
            render_chat(tokenizer, messages, request.add_generation_prompt, request.continue_final_message, request.chat_template_kwargs),
            "messages",
        )
    else:
        text, param = request.prompt, "prompt"
    ids = checked(tokenizer.encode, text, param, request.add_special_tokens)
    strs = [tokenizer.token_text(i) for i in ids] if request.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=max_model_len, tokens=ids, token_strs=strs)


def detokenize(request: DetokenizeRequest, tokenizer: Tokenizer) -> DetokenizeResponse:
    """The text token ids spell, special tokens included."""
    check_ids(request.tokens, tokenizer.vocab_size, "tokens")
    return DetokenizeResponse(prompt=tokenizer.decode(request.tokens))


def tokenizer_card(tokenizer: Tokenizer, max_model_len: int) -> dict:
    """GET /tokenizer_info, as vLLM answers it: what a client needs to tokenize through /tokenize (lm-eval's remote tokenizer)."""
    hf = tokenizer.hf
    return {
        "tokenizer_class": type(hf).__name__,
        "eos_token": hf.eos_token,
        "bos_token": hf.bos_token,
        "pad_token": hf.pad_token,
        "unk_token": hf.unk_token,
        "chat_template": tokenizer.chat_template,
        "model_max_length": max_model_len,
        "vocab_size": tokenizer.vocab_size,
    }


def _validated(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc) from None
