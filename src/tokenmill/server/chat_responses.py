"""Engine outputs -> chat.completion objects and chat.completion.chunk events."""

from __future__ import annotations

import json
import re
from typing import cast

from tokenmill.outputs import ChoiceDelta, Logprobs, RequestOutput
from tokenmill.server.chat_protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessage,
    ChoiceLogprobs,
    DeltaFunction,
    DeltaToolCall,
    FunctionCall,
    TokenLogprob,
    ToolCallOut,
    TopLogprob,
)
from tokenmill.server.responses import Accumulator, Header, new_id, usage_of
from tokenmill.server.tool_calls import HermesCalls
from tokenmill.tokenizer import Tokenizer


class ChatRender:
    """Shapes one chat request's outputs: whole replies, or the events of a stream.

    tools: the functions a forced tool call chooses from; the generated text is then the call (one
    function's arguments, or {"name", "arguments"} when there are several) and becomes `tool_calls`.
    auto: the model chose between text and calls in its own format (tool_choice 'auto'); the calls are read out of the text.
    """

    def __init__(
        self,
        header: Header,
        tokenizer: Tokenizer,
        choices: int,
        echo: str = "",
        include_usage: bool = False,
        tools: list[str] | None = None,
        auto: bool = False,
    ):
        self.header, self.tokenizer, self.choices = header, tokenizer, choices
        self.echo, self.include_usage, self.tools = echo, include_usage, tools or []
        self._call_ids = [new_id("call_")[:29] for _ in range(choices)]  # one call per choice, one id through its stream
        self._held = [""] * choices  # several tools, streamed: the call is sent whole once its name is known
        self._parsers = [HermesCalls() for _ in range(choices)] if auto else None

    def whole(self, acc: Accumulator) -> dict:
        """The chat.completion object, from every output of the request."""
        choices = [self._choice(c) for c in acc.deltas()]
        reply = ChatCompletion(**self.header.fields(), choices=choices, usage=acc.usage())
        return reply.model_dump()

    def _choice(self, c: ChoiceDelta) -> ChatChoice:
        """One whole choice of the reply."""
        assert c.finish_reason is not None  # the whole reply is rendered once every choice has finished
        logprobs = self._logprobs(c.logprobs)
        if self._parsers is not None:
            parser = self._parsers[c.index]
            text, calls = parser.feed(c.text)
            content = self.echo + text + parser.finish()  # as a stream sends it: the echo first, then the text
            tool_calls = [ToolCallOut(id=new_id("call_")[:29], function=FunctionCall(name=name, arguments=arguments)) for name, arguments in calls]
            message = ChatMessage(content=content if content or not tool_calls else None, tool_calls=tool_calls or None)
            return ChatChoice(index=c.index, message=message, logprobs=logprobs, finish_reason=self._auto_reason(c))
        if not self.tools:
            return ChatChoice(index=c.index, message=ChatMessage(content=self.echo + c.text), logprobs=logprobs, finish_reason=c.finish_reason)
        name, arguments = self._call(c.text)
        call = ToolCallOut(id=self._call_ids[c.index], function=FunctionCall(name=name, arguments=arguments))
        return ChatChoice(index=c.index, message=ChatMessage(content=None, tool_calls=[call]), logprobs=logprobs, finish_reason=_reason(c.finish_reason))

    def _call(self, text: str) -> tuple[str, str]:
        """A forced call's function name and arguments, from its generated text (cut short by max_tokens, as it may be)."""
        if len(self.tools) == 1:
            return self.tools[0], text
        try:
            call = json.loads(text)
            return call["name"], json.dumps(call["arguments"], ensure_ascii=False, separators=(",", ":"))
        except (ValueError, KeyError, TypeError):  # cut short: not yet a whole call
            named = re.match(r'\{"name":"([^"]*)"', text)
            return (named.group(1) if named else ""), text

    def opening(self) -> list[dict]:
        """Each choice's first chunk: the role, and the echoed text if any (sent before any token, as OpenAI does).

        With one forced function, the call's id and name come first too, then its arguments piece by piece.
        """
        deltas = [ChatDelta(role="assistant", content=None if self.tools else self.echo) for _ in range(self.choices)]
        if len(self.tools) == 1:
            for i, delta in enumerate(deltas):
                delta.tool_calls = [DeltaToolCall(index=0, id=self._call_ids[i], type="function", function=DeltaFunction(name=self.tools[0], arguments=""))]
        return [self._chunk([ChatChunkChoice(index=i, delta=d)]) for i, d in enumerate(deltas)]

    def chunks(self, output: RequestOutput) -> list[dict]:
        """The chunks one engine output makes: a content delta per choice, then usage at the end if asked."""
        out = [self._chunk([self._chunk_choice(d)]) for d in output.choices]
        if output.finished and self.include_usage:
            out.append(self._chunk([], usage_of(output)))
        return out

    def _chunk_choice(self, delta: ChoiceDelta) -> ChatChunkChoice:
        logprobs = self._logprobs(delta.logprobs)
        if self._parsers is not None:
            return ChatChunkChoice(index=delta.index, delta=self._auto_delta(delta), logprobs=logprobs, finish_reason=self._auto_reason(delta))
        if self.tools:
            return ChatChunkChoice(index=delta.index, delta=self._call_delta(delta), logprobs=logprobs, finish_reason=_reason(delta.finish_reason))
        content = ChatDelta(content=delta.text) if delta.text or not delta.finish_reason else ChatDelta()
        return ChatChunkChoice(index=delta.index, delta=content, logprobs=logprobs, finish_reason=delta.finish_reason)

    def _call_delta(self, delta: ChoiceDelta) -> ChatDelta:
        """A forced call's next piece: its arguments as they come (one function), or the whole call at the end (several)."""
        if len(self.tools) == 1:
            piece = [DeltaToolCall(index=0, function=DeltaFunction(arguments=delta.text))] if delta.text else None
            return ChatDelta(tool_calls=piece)
        self._held[delta.index] += delta.text
        if not delta.finish_reason:
            return ChatDelta()
        name, arguments = self._call(self._held[delta.index])
        call = DeltaToolCall(index=0, id=self._call_ids[delta.index], type="function", function=DeltaFunction(name=name, arguments=arguments))
        return ChatDelta(tool_calls=[call])

    def _auto_delta(self, delta: ChoiceDelta) -> ChatDelta:
        """tool_choice 'auto': the content and the whole calls this piece of text completes (the rest at the end)."""
        assert self._parsers is not None
        parser = self._parsers[delta.index]
        before = parser.calls
        content, calls = parser.feed(delta.text)
        if delta.finish_reason:
            content += parser.finish()
        pieces = [
            DeltaToolCall(index=before + k, id=new_id("call_")[:29], type="function", function=DeltaFunction(name=name, arguments=arguments))
            for k, (name, arguments) in enumerate(calls)
        ]
        return ChatDelta(content=content or None, tool_calls=pieces or None)

    def _auto_reason(self, delta: ChoiceDelta):
        """A reply whose calls the grammar completed finishes with tool_calls; one with no call (or cut short) as usual."""
        assert self._parsers is not None
        return _reason(delta.finish_reason) if self._parsers[delta.index].calls else delta.finish_reason

    def _chunk(self, choices: list[ChatChunkChoice], usage=None) -> dict:
        chunk = ChatCompletionChunk(**self.header.fields(), choices=choices, usage=usage)
        return chunk.model_dump(exclude=None if self.include_usage else {"usage"})

    def _logprobs(self, logprobs: Logprobs | None) -> ChoiceLogprobs | None:
        """Chat's logprobs: per token its text, bytes and exactly the asked-for number of alternatives."""
        if logprobs is None:
            return None
        tok = self.tokenizer
        content = [
            TokenLogprob(
                token=text,
                logprob=cast(float, lp),  # only echoed prompt tokens have none, and chat echoes text, not tokens
                bytes=tok.token_bytes_of(token_id),
                top_logprobs=[TopLogprob(token=tok.token_text(t), logprob=v, bytes=tok.token_bytes_of(t)) for t, v in ranked or []],
            )
            for text, lp, token_id, ranked in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.token_ids, logprobs.ranked, strict=True)
        ]
        return ChoiceLogprobs(content=content)


def _reason(finish: str | None):
    """A forced call that its grammar completed finishes as OpenAI says: tool_calls."""
    return "tool_calls" if finish == "stop" else finish
