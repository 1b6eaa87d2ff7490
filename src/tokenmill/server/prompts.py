"""Prompts as the engine takes them: token ids checked against the vocabulary and the context."""

from __future__ import annotations

from tokenmill.sampling_params import Prompt
from tokenmill.server.chat_protocol import ChatCompletionRequest, template_messages
from tokenmill.server.errors import APIError, clip, invalid
from tokenmill.server.protocol import CompletionRequest
from tokenmill.tokenizer import ChatTemplateError, NoChatTemplate, Tokenizer, UnencodableText

NO_TEMPLATE = (
    "This model has no chat template, so /v1/chat/completions cannot build a prompt from messages. Start the server "
    "with --chat-template FILE (a Jinja template), or send the prompt text to /v1/completions."
)

# A normalizer can shrink text before it is split (Hangul jamo compose three to one), so the
# cheap lower bound on a text's tokens divides by this much more than the longest token.
NORMALIZER_SLACK = 4


def encode_prompts(request: CompletionRequest, tokenizer: Tokenizer, max_model_len: int, max_sequences: int = 256) -> list[Prompt]:
    """Every prompt of a request, tokenized, wrapped for fill-in-the-middle, and length-checked.

    max_sequences: the most prompts x best_of the engine runs at once (its --max-num-seqs).
    """
    if request.suffix:
        if tokenizer.fim is None:
            raise invalid("This model cannot insert text: its tokenizer has no fill-in-the-middle tokens, so 'suffix' is not supported.", "suffix")
        checked(tokenizer.check_encodable, request.suffix, "suffix")
    items = _split(request.prompt)
    if len(items) * request.best_of_ > max_sequences:
        raise invalid(
            f"This request asks for {len(items) * request.best_of_} sequences (prompts x best_of); at most {max_sequences} are served at once.", "prompt"
        )
    for item in items:  # what is surely too long is refused before it is tokenized or copied
        if isinstance(item, str):
            _check_chars(len(item) + len(request.suffix or ""), tokenizer.max_token_chars, request.max_tokens_, max_model_len)
        elif isinstance(item, list):
            _check_length(len(item), request.max_tokens_, max_model_len)
    prompts = [_encode(item, tokenizer, request.suffix) for item in items]
    for prompt in prompts:
        check_ids(prompt.token_ids, tokenizer.vocab_size, "prompt")
        _check_length(len(prompt.token_ids), request.max_tokens_, max_model_len)
    for key in request.logit_bias or {}:
        check_ids([int(key)], tokenizer.vocab_size, "logit_bias")
    return prompts


def encode_chat(request: ChatCompletionRequest, tokenizer: Tokenizer, max_model_len: int, max_sequences: int = 256) -> tuple[Prompt, int]:
    """The conversation through the chat template, as ids; and the reply's token limit.

    With no limit given the reply may run to the end of the context, as OpenAI's and vLLM's do.
    """
    if request.n_ > max_sequences:
        raise invalid(f"This request asks for {request.n_} choices; at most {max_sequences} are served at once.", "n")
    messages = template_messages(request.messages)
    text = render_chat(
        tokenizer, messages, request.add_generation_prompt, request.continue_final_message, request.chat_template_kwargs, request.template_tools()
    )
    limit = request.token_limit
    _check_chars(len(text), tokenizer.max_token_chars, limit or 1, max_model_len, "messages")
    ids = checked(tokenizer.encode, text, "messages", False)  # the template wrote any BOS itself
    _check_length(len(ids), limit or 1, max_model_len, "messages")
    for key in request.logit_bias or {}:
        check_ids([int(key)], tokenizer.vocab_size, "logit_bias")
    return Prompt(tuple(ids), text), limit or max_model_len - len(ids)


def render_chat(
    tokenizer: Tokenizer,
    messages: list[dict],
    add_generation_prompt: bool,
    continue_final_message: bool,
    template_kwargs: dict | None,
    tools: list[dict] | None = None,
) -> str:
    """A conversation through the chat template, with its failures as 400s."""
    reserved = next((k for k in template_kwargs or {} if k in tokenizer.reserved_template_args), None)
    if reserved is not None:
        raise invalid(f"'chat_template_kwargs' cannot set {clip(repr(reserved))}: it is an argument of the template call itself.", "chat_template_kwargs")
    try:
        return tokenizer.render_chat(messages, add_generation_prompt, continue_final_message, tools, **(template_kwargs or {}))
    except NoChatTemplate:
        raise invalid(NO_TEMPLATE, "messages", code="no_chat_template") from None
    except ChatTemplateError as exc:
        raise invalid(f"The model's chat template refused these messages: {clip(str(exc), 500)}", "messages") from None


def _split(prompt) -> list:
    """One entry per prompt: a string, a token array, or None (the start of a document)."""
    if prompt is None or isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def _encode(item, tokenizer: Tokenizer, suffix: str | None) -> Prompt:
    """One prompt to ids; text is kept for echo."""
    if suffix:
        if isinstance(item, str):
            prefix = checked(tokenizer.encode, item, "prompt", False)
        else:
            prefix = list(item or [])
        return Prompt(tuple(tokenizer.encode_fim(prefix, suffix)))
    if item is None:
        return Prompt(tuple(tokenizer.document_start()))
    if isinstance(item, list):
        return Prompt(tuple(item))
    ids = checked(tokenizer.encode, item, "prompt") or tokenizer.document_start()
    return Prompt(tuple(ids), item, skip=tokenizer.added_prefix if ids else 0)


def checked(fn, text: str, param: str, *args):
    """fn(text), with text the vocabulary cannot spell answered as a 400 naming `param`."""
    try:
        return fn(text, *args)
    except UnencodableText as exc:
        raise invalid(f"'{param}' cannot be tokenized: {exc}.", param) from None


def check_ids(ids, vocab_size: int, param: str) -> None:
    """Token ids must name tokens of this model."""
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise invalid(f"Token id {clip(bad)} in '{param}' is out of range: this model's token ids are 0..{vocab_size - 1}.", param)


def _check_chars(chars: int, max_token_chars: int, max_tokens: int, max_model_len: int, param: str = "prompt") -> None:
    """Refuse a text too long to fit before tokenizing it: megabytes of prompt cost seconds.

    Only a text that cannot fit even alone is refused here; any other is tokenized (a bounded cost),
    so that the error counts its tokens.
    """
    at_least = -(-chars // (max_token_chars * NORMALIZER_SLACK))
    if at_least > max_model_len:
        raise _too_long(
            max_model_len,
            f"your prompt is {chars} characters, which is at least {at_least} tokens, and {clip(max_tokens)} are requested for the completion",
            param,
        )


def _check_length(prompt_tokens: int, max_tokens: int, max_model_len: int, param: str = "prompt") -> None:
    """Prompt plus completion must fit the context window."""
    if prompt_tokens + max_tokens > max_model_len:
        raise _too_long(
            max_model_len,
            f"you requested {clip(prompt_tokens + max_tokens)} tokens ({prompt_tokens} in your prompt; {clip(max_tokens)} for the completion)",
            param,
        )


def _too_long(max_model_len: int, detail: str, param: str) -> APIError:
    """OpenAI's context_length_exceeded error, with what the request asked for."""
    message = f"This model's maximum context length is {max_model_len} tokens. However, {detail}. Please reduce your prompt; or completion length."
    return invalid(message, param, code="context_length_exceeded")
