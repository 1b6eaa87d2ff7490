"""tool_choice 'auto': whether a request may use it here, and its calls read back out of the model's own text.

The model writes Hermes-style calls (Qwen2.5, Hermes and many small models):
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, after optional text. The grammar
(grammars.hermes_tools_lark) makes every call that begins well formed; this side splits the text
into content and calls, the same way for a whole reply and for a stream fed piece by piece.
"""

from __future__ import annotations

import json

from tokenmill.grammars import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from tokenmill.server.errors import invalid
from tokenmill.tokenizer import Tokenizer


def check_auto_tools(parser: str, tokenizer: Tokenizer) -> None:
    """tool_choice 'auto' needs a parser for the model's calls and a template that shows the model its tools; else a 400."""
    if parser == "none":
        why = "this server was started with --tool-call-parser none"
    elif not tokenizer.renders_tools:
        why = "this model's chat template does not write 'tools' into the prompt, so the model cannot choose to call them (a --chat-template that does would)"
    else:
        return
    raise invalid(
        f"Unsupported parameter: 'tool_choice' 'auto' (the default once 'tools' are given): {why}. Send 'required', 'none' or a named function.",
        "tool_choice",
        code="unsupported_parameter",
    )


class HermesCalls:
    """Splits one choice's text into content and tool calls as it arrives; feed() then finish() gives the same for any split.

    Text that may still become `<tool_call>` is held back; a call is given once its `</tool_call>`
    arrives. Whitespace between calls is not content. At the end, anything held (a call cut short
    by max_tokens) is content, as written.
    """

    def __init__(self):
        self._held = ""
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[tuple[str, str]]]:
        """The content and the (name, arguments) calls that this piece completes."""
        self._held += text
        content, calls = [], []
        while True:
            start = self._held.find(TOOL_CALL_OPEN)
            if start < 0:
                keep = _open_prefix(self._held)
                content.append(self._content(self._held[: len(self._held) - keep]))
                self._held = self._held[len(self._held) - keep :]
                break
            content.append(self._content(self._held[:start]))
            self._held = self._held[start:]
            end = self._held.find(TOOL_CALL_CLOSE)
            if end < 0:
                break
            call = _parse(self._held[len(TOOL_CALL_OPEN) : end])
            if call is None:  # not a call after all (no grammar made it): it is text
                content.append(self._held[: end + len(TOOL_CALL_CLOSE)])
            else:
                calls.append(call)
                self.calls += 1
            self._held = self._held[end + len(TOOL_CALL_CLOSE) :]
        return "".join(content), calls

    def finish(self) -> str:
        """What is left at the end of the output, as content (whitespace after the last call is not)."""
        rest, self._held = self._held, ""
        return self._content(rest)

    def _content(self, text: str) -> str:
        return "" if self.calls and not text.strip() else text


def _open_prefix(text: str) -> int:
    """How many characters at the end of text could begin `<tool_call>`."""
    for n in range(min(len(text), len(TOOL_CALL_OPEN) - 1), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-n:]):
            return n
    return 0


def _parse(body: str) -> tuple[str, str] | None:
    """A call's name and its arguments as JSON text, or None if the body is not {"name": str, "arguments": object}."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(call.get("arguments", {}), dict):
        return None
    return call["name"], json.dumps(call.get("arguments", {}), ensure_ascii=False)
