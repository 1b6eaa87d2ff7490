"""Structured outputs: JSON schemas, regular expressions, choices and GBNF grammars, compiled by llguidance.

No torch here: the server compiles a request's grammar before it is queued (a bad one is a 400), and the
engine keeps one matcher per constrained sequence, asking it each step which tokens may come next.
Compiled grammars are cached by their text.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import llguidance
from llguidance.gbnf_to_lark import gbnf_to_lark

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

from tokenmill.sampling_params import GrammarSpec

CACHE_SIZE = 256  # compiled grammars kept, least recently used out
# JSON as compact as the schema allows: no free whitespace for a small model to loop on.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A schema, expression or grammar that cannot be compiled; the message says why."""


class GrammarCompiler:
    """Compiles specs against one model's vocabulary (built once, on first use), and makes matchers."""

    def __init__(self, hf_tokenizer, vocab_size: int):
        self._hf, self._vocab_size = hf_tokenizer, vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[GrammarSpec, str] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        """The vocabulary its masks cover."""
        return self._vocab_size

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary (about 0.5 s to build for a 49k vocabulary)."""
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf  # imports transformers (~1.7 s): only once a grammar is first used

                self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab_size)
            return self._tokenizer

    def compile(self, spec: GrammarSpec) -> str:
        """The spec as an llguidance grammar, checked against the vocabulary; raises GrammarError."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        grammar = _grammar(spec, self._as_token)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise GrammarError("; ".join(messages))
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def _as_token(self, text: str) -> bool:
        """Whether text is one token that llguidance matches only by id (added tokens such as Qwen2.5's <tool_call>)."""
        ids = self.tokenizer.tokenize_str(text)
        return len(ids) == 1 and self.tokenizer.is_special_token(ids[0])

    def matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the spec's grammar."""
        matcher = llguidance.LLMatcher(self.tokenizer, self.compile(spec))
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher


def _grammar(spec: GrammarSpec, as_token: Callable[[str], bool]) -> str:
    """llguidance's grammar text for a spec; as_token tells which marker texts are tokens of their own."""
    try:
        if spec.kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(spec.text, defaults=JSON_OPTIONS)
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.text)
        if spec.kind == "hermes_tools":
            return llguidance.LLMatcher.grammar_from_lark(hermes_tools_lark(json.loads(spec.text), as_token(TOOL_CALL_OPEN), as_token(TOOL_CALL_CLOSE)))
        if spec.kind == "choice":
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(spec.text)))
        return llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(spec.text))
    except Exception as exc:  # the client's text is at fault whatever the converter raises (gbnf_to_lark raises plain Exception)
        raise GrammarError(str(exc) or type(exc).__name__) from None


# Hermes-style calls, as Qwen2.5, Hermes and many small models write them (their templates' tojson spacing).
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
HERMES_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def hermes_tools_lark(options: dict, open_token: bool = False, close_token: bool = False) -> str:
    """Free text, or text up to <tool_call> and then only well-formed calls: the arguments follow their schema once a call begins.

    Written as text, the opening is a lazy lexeme: it ends at the first <tool_call>, and from there
    the output may only be "\\n{call}\\n</tool_call>", more calls on new lines when parallel, then
    the end. Where a marker is a token of its own, the grammar names the token instead (text cannot spell it).
    """
    call = json.dumps({**options["calls"], "x-guidance": HERMES_JSON})
    opening = f"TEXT {TOOL_CALL_OPEN}" if open_token else "lead"
    close = f'"\\n" {TOOL_CALL_CLOSE}' if close_token else f'"\\n{TOOL_CALL_CLOSE}"'
    more = f'"\\n" {TOOL_CALL_OPEN}' if open_token else f'"\\n{TOOL_CALL_OPEN}"'
    lines = [
        "%llguidance {}",
        f"start: TEXT | {opening} body" + (" (more body)*" if options["parallel"] else ""),
        f'body: "\\n" call {close}',
        f"call: %json {call}",
        "TEXT: /(.|\\n)*/",
    ]
    if not open_token:
        lines.append(f"lead[lazy]: /(.|\\n)*{TOOL_CALL_OPEN}/")
    if options["parallel"]:
        lines.append(f"more: {more}")
    return "\n".join(lines)
