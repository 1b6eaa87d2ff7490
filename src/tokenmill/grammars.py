"""Structured outputs: JSON schemas, regular expressions, choices and GBNF grammars, compiled by llguidance.

No torch here: the server compiles a request's grammar before it is queued (a bad one is a 400), and the
engine keeps one matcher per constrained sequence, asking it each step which tokens may come next.
Compiled grammars are cached by their text.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
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
        grammar = _grammar(spec)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise GrammarError("; ".join(messages))
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the spec's grammar."""
        matcher = llguidance.LLMatcher(self.tokenizer, self.compile(spec))
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher


def _grammar(spec: GrammarSpec) -> str:
    """llguidance's grammar text for a spec."""
    try:
        if spec.kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(spec.text, defaults=JSON_OPTIONS)
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.text)
        if spec.kind == "choice":
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(spec.text)))
        return llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(spec.text))
    except Exception as exc:  # the client's text is at fault whatever the converter raises (gbnf_to_lark raises plain Exception)
        raise GrammarError(str(exc) or type(exc).__name__) from None
