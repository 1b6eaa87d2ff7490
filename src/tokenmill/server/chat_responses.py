"""Engine outputs -> chat.completion objects and chat.completion.chunk events."""

from __future__ import annotations

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
    TokenLogprob,
    TopLogprob,
)
from tokenmill.server.responses import Accumulator, Header, usage_of
from tokenmill.tokenizer import Tokenizer


class ChatRender:
    """Shapes one chat request's outputs: whole replies, or the events of a stream."""

    def __init__(self, header: Header, tokenizer: Tokenizer, choices: int, echo: str = "", include_usage: bool = False):
        self.header, self.tokenizer, self.choices = header, tokenizer, choices
        self.echo, self.include_usage = echo, include_usage

    def whole(self, acc: Accumulator) -> dict:
        """The chat.completion object, from every output of the request."""
        choices = [self._choice(c) for c in acc.deltas()]
        reply = ChatCompletion(
            id=self.header.id,
            created=self.header.created,
            model=self.header.model,
            system_fingerprint=self.header.system_fingerprint,
            choices=choices,
            usage=acc.usage(),
        )
        return reply.model_dump()

    def _choice(self, c: ChoiceDelta) -> ChatChoice:
        """One whole choice of the reply."""
        assert c.finish_reason is not None  # the whole reply is rendered once every choice has finished
        return ChatChoice(index=c.index, message=ChatMessage(content=self.echo + c.text), logprobs=self._logprobs(c.logprobs), finish_reason=c.finish_reason)

    def opening(self) -> list[dict]:
        """Each choice's first chunk: the role, and the echoed text if any (sent before any token, as OpenAI does)."""
        return [self._chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=self.echo))]) for i in range(self.choices)]

    def chunks(self, output: RequestOutput) -> list[dict]:
        """The chunks one engine output makes: a content delta per choice, then usage at the end if asked."""
        out = [self._chunk([self._chunk_choice(d)]) for d in output.choices]
        if output.finished and self.include_usage:
            out.append(self._chunk([], usage_of(output)))
        return out

    def _chunk_choice(self, delta: ChoiceDelta) -> ChatChunkChoice:
        content = ChatDelta(content=delta.text) if delta.text or not delta.finish_reason else ChatDelta()
        return ChatChunkChoice(index=delta.index, delta=content, logprobs=self._logprobs(delta.logprobs), finish_reason=delta.finish_reason)

    def _chunk(self, choices: list[ChatChunkChoice], usage=None) -> dict:
        chunk = ChatCompletionChunk(
            id=self.header.id,
            created=self.header.created,
            model=self.header.model,
            system_fingerprint=self.header.system_fingerprint,
            choices=choices,
            usage=usage,
        )
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
