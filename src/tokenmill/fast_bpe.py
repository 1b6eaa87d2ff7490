"""A tiktoken Encoding built in-process from a byte-level BPE tokenizer, checked against it."""

from __future__ import annotations

import json
from dataclasses import dataclass

import tiktoken

# What ByteLevel(use_regex=true) splits on; tokenizer.json does not spell it out (it is GPT-2's).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits(individual_digits=true) then ByteLevel: every digit alone, whitespace never swallows one.
DIGITS_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""

# Checked at load: both encoders must agree on every string (plus the model's special tokens).
SAMPLE = [
    "",
    "Hello, world!",
    "The capital of France is",
    " leading space",
    "trailing space ",
    "  two  spaces  ",
    "tabs\tand\t\ttabs",
    "new\nlines\n\n\nand\r\ncarriage returns\r",
    "    def f(x):\n        return x ** 2  # square\n",
    "numbers 0 1 12 123 1234 12345 3.14159 1e-9 -42 +7",
    "  1\n  22\n\t333",
    "x1y22z333",
    "٣٤٥ ² ½ Ⅻ",
    "don't I'll we've they're she'd it's I'm",
    "DON'T YOU'LL",
    "naïve café façade résumé über straße",
    "Ελληνικά русский текст עברית العربية",
    "中文字符 日本語のテキスト 한국어",
    "emoji 🙂🚀👩‍👩‍👧 flags 🇫🇷",
    "math ∑∫√∞≠≤ arrows ←→ symbols ©®™ §¶",
    "mixed\u00a0nbsp\u2003em\u200bzero-width",
    "!!!???...,,,;;;",
    '<html><body class="x">a &amp; b</body></html>',
    '{"key": [1, 2, {"nested": null}]}',
    "a" * 300,
    " " * 40 + "x",
]


class UnsupportedTokenizer(Exception):
    """This tokenizer cannot be expressed as a tiktoken Encoding."""


@dataclass
class FastEncoder:
    """tiktoken for the body of the text, plus the special tokens HF's post-processor adds."""

    encoding: tiktoken.Encoding
    prefix: list[int]  # e.g. BOS, for add_special_tokens=True
    suffix: list[int]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.encoding.encode(text, allowed_special="all")
        return [*self.prefix, *ids, *self.suffix] if add_special_tokens else ids


def split_pattern(pre_tokenizer: dict | None) -> str:
    """The regex that a byte-level pre-tokenizer splits text with."""
    if _is_byte_level(pre_tokenizer, regex=True):
        return GPT2_PATTERN
    parts = (pre_tokenizer or {}).get("pretokenizers") or []
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and _is_byte_level(parts[1], regex=True):
        return DIGITS_PATTERN
    if kinds == ["Split", "ByteLevel"] and _is_isolated_regex(parts[0]) and _is_byte_level(parts[1], regex=False):
        return parts[0]["pattern"]["Regex"]  # Llama 3, Qwen2: the pattern is written out
    raise UnsupportedTokenizer(f"pre-tokenizer {json.dumps(pre_tokenizer)[:200]}")


def _is_byte_level(p: dict | None, regex: bool) -> bool:
    if not p:
        return False
    return p.get("type") == "ByteLevel" and p.get("use_regex", True) == regex and not p.get("add_prefix_space")


def _is_isolated_regex(p: dict) -> bool:
    return "Regex" in p.get("pattern", {}) and p.get("behavior") == "Isolated" and not p.get("invert")


def build(hf_tokenizer, token_bytes: list[bytes]) -> FastEncoder:
    """A FastEncoder from the tokenizer's own vocabulary, merge order, pattern and special tokens."""
    spec = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or spec.get("normalizer") or model.get("byte_fallback") or model.get("dropout"):
        raise UnsupportedTokenizer("not a plain byte-level BPE")
    added = {t.content: i for i, t in hf_tokenizer.added_tokens_decoder.items()}
    if any(t.lstrip or t.rstrip or t.single_word for t in hf_tokenizer.added_tokens_decoder.values()):
        raise UnsupportedTokenizer("added tokens that strip whitespace")
    # tiktoken merges by the rank of the merged bytes; with ranks = ids this is HF's merge order
    # whenever ids were assigned in merge order (true of trained BPEs; the sample check proves it).
    ranks = {token_bytes[i]: i for i in range(len(token_bytes)) if i not in added.values()}
    if len(ranks) + len(added) != len(token_bytes):
        raise UnsupportedTokenizer("two tokens share the same bytes")
    encoding = tiktoken.Encoding(name="tokenmill", pat_str=split_pattern(spec.get("pre_tokenizer")), mergeable_ranks=ranks, special_tokens=added)
    return FastEncoder(encoding, *special_affixes(hf_tokenizer))


def special_affixes(hf_tokenizer) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a text's own (BOS, EOS)."""
    plain = hf_tokenizer.encode("a", add_special_tokens=False)
    full = hf_tokenizer.encode("a", add_special_tokens=True)
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    raise UnsupportedTokenizer("the post-processor changes the text's own tokens")


def mismatches(fast: FastEncoder, hf_tokenizer, texts: list[str]) -> list[str]:
    """The texts on which the two encoders disagree."""
    return [t for t in texts if fast.encode(t) != hf_tokenizer.encode(t, add_special_tokens=True)]


def load_sample(hf_tokenizer) -> list[str]:
    """SAMPLE, and each special token inside text."""
    specials = [t.content for t in hf_tokenizer.added_tokens_decoder.values()]
    return SAMPLE + [f"before{s}after {s} {s}{s}\n" for s in specials]
