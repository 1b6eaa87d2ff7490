"""Prompts as the engine takes them: token ids checked against the vocabulary and the context."""

from __future__ import annotations

from tokenmill.sampling_params import Prompt
from tokenmill.server.errors import invalid
from tokenmill.server.protocol import CompletionRequest
from tokenmill.tokenizer import Tokenizer, UnencodableText


def encode_prompts(request: CompletionRequest, tokenizer: Tokenizer, max_model_len: int) -> list[Prompt]:
    """Every prompt of a request, tokenized, wrapped for fill-in-the-middle, and length-checked."""
    if request.suffix and tokenizer.fim is None:
        raise invalid("This model cannot insert text: its tokenizer has no fill-in-the-middle tokens, so 'suffix' is not supported.", "suffix")
    prompts = [_encode(item, tokenizer, request.suffix) for item in _split(request.prompt)]
    max_tokens = 16 if request.max_tokens is None else request.max_tokens
    for prompt in prompts:
        _check_ids(prompt.token_ids, tokenizer.vocab_size, "prompt")
        _check_length(len(prompt.token_ids), max_tokens, max_model_len)
    for key in request.logit_bias or {}:
        _check_ids([int(key)], tokenizer.vocab_size, "logit_bias")
    return prompts


def _split(prompt) -> list:
    """One entry per prompt: a string, a token array, or None (the start of a document)."""
    if prompt is None or isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def _encode(item, tokenizer: Tokenizer, suffix: str | None) -> Prompt:
    """One prompt to ids; text is kept for echo."""
    for text, param in ((item, "prompt"), (suffix, "suffix")):
        try:
            tokenizer.check_encodable(text) if isinstance(text, str) else None
        except UnencodableText as exc:
            raise invalid(f"'{param}' cannot be tokenized: {exc}.", param) from None
    if item is None:
        ids, text = tokenizer.document_start(), None
    elif isinstance(item, str):
        ids, text = tokenizer.encode(item, add_special_tokens=not suffix), item
    else:
        ids, text = list(item), None
    if suffix:
        ids, text = tokenizer.encode_fim(ids, suffix), None
    if not ids:
        ids = tokenizer.document_start()
    return Prompt(tuple(ids), text)


def _check_ids(ids, vocab_size: int, param: str) -> None:
    """Token ids must name tokens of this model."""
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise invalid(f"Token id {bad} in '{param}' is out of range: this model's token ids are 0..{vocab_size - 1}.", param)


def _check_length(prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """Prompt plus completion must fit the context window."""
    if prompt_tokens + max_tokens > max_model_len:
        raise invalid(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in your prompt; {max_tokens} for the "
            "completion). Please reduce your prompt; or completion length.",
            "prompt",
            code="context_length_exceeded",
        )
