"""The model's tokenizer behind the few calls the server makes (no torch here)."""

from __future__ import annotations

import inspect
import json
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

from tokenmill import fast_bpe
from tokenmill.grammars import GrammarCompiler

log = logging.getLogger(__name__)

# Spellings of fill-in-the-middle tokens: (prefix, suffix, middle).
FIM_SPELLINGS = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SmolLM
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder
    ("<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"),
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
    ("<PRE>", "<SUF>", "<MID>"),  # CodeLlama
)


class UnencodableText(ValueError):
    """Text holds a character this vocabulary has no bytes for."""


class NoChatTemplate(ValueError):
    """The model has no chat template, and none was given."""


class ChatTemplateError(ValueError):
    """The chat template raised on a conversation."""


@dataclass(frozen=True)
class FimTokens:
    """Token ids that frame a fill-in-the-middle prompt."""

    prefix: int
    suffix: int
    middle: int


def _longest_token(hf_tokenizer, token_bytes: list[bytes] | None) -> int:
    """The most characters one token can stand for: a text of N characters is at least N / this tokens."""
    if token_bytes is not None:  # byte-level: one byte or more per character
        return max(map(len, token_bytes))
    pieces = hf_tokenizer.convert_ids_to_tokens(list(range(len(hf_tokenizer))))  # SentencePiece: one per character
    return max((len(p) for p in pieces if p), default=1)


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class Tokenizer:
    """Encode, decode and name tokens for one model."""

    def __init__(self, hf_tokenizer, model_vocab_size: int | None = None, fast: bool = True, chat_template: str | None = None):
        self.hf = hf_tokenizer
        size = len(hf_tokenizer)
        self.vocab_size = min(size, model_vocab_size) if model_vocab_size else size
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.token_bytes = _byte_level_table(hf_tokenizer)  # None unless byte-level BPE
        self._single_bytes = _single(self.token_bytes) if self.token_bytes else b""
        self.fim = _find_fim(hf_tokenizer)
        self._fast = _fast_encoder(hf_tokenizer, self.token_bytes, self._single_bytes) if fast else None
        self.name = "tiktoken" if self._fast else "huggingface"
        self.max_token_chars = _longest_token(hf_tokenizer, self.token_bytes)
        self.added_prefix = len(self._fast.prefix) if self._fast else _prefix_length(hf_tokenizer)
        self._lock = threading.Lock()  # HF fast tokenizers are not safe to share between threads
        self.special_ids = _special_ids(hf_tokenizer)
        self.chat_template = chat_template or getattr(hf_tokenizer, "chat_template", None) or None
        # apply_chat_template's own arguments (tokenize, tools, ...): not for chat_template_kwargs to set
        self.reserved_template_args = frozenset(inspect.signature(hf_tokenizer.apply_chat_template).parameters) - {"kwargs"}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids, with the model's usual special tokens (BOS) when asked."""
        self.check_encodable(text)
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens)
        with self._lock:
            return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def check_encodable(self, text: str) -> None:
        """Refuse text the vocabulary cannot spell (HF would drop it silently, tiktoken panics)."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise UnencodableText(f"the text holds a lone surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}") from None
        if self.token_bytes is None or not data.translate(None, self._single_bytes):
            return
        at = next(i for i, c in enumerate(text) if c.encode().translate(None, self._single_bytes))
        raise UnencodableText(f"this model's vocabulary cannot encode the character U+{ord(text[at]):04X} at character {at}")

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, special tokens included, nothing cleaned up."""
        if self.token_bytes is not None:
            return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", "replace")
        with self._lock:
            return self.hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @cached_property
    def grammars(self) -> GrammarCompiler:
        """Structured-output grammars for this vocabulary (llguidance's tokenizer is built on first use)."""
        return GrammarCompiler(self.hf, self.vocab_size)

    def decode_text(self, ids: Sequence[int]) -> str:
        """Ids -> text, special tokens left out (a chat reply's text)."""
        if self.token_bytes is not None:
            return b"".join(self.token_bytes[i] for i in ids if i not in self.special_ids).decode("utf-8", "replace")
        with self._lock:
            return self.hf.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def render_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, continue_final_message: bool = False, tools: list[dict] | None = None, **template_kwargs
    ) -> str:
        """A conversation as the model's chat template writes it.

        Raises NoChatTemplate when the model has none, and ChatTemplateError with the template's own
        message when it refuses the conversation.
        """
        if self.chat_template is None:
            raise NoChatTemplate("this model has no chat template")
        kwargs = {**template_kwargs, "add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message, "tools": tools}
        try:
            with self._lock:
                return self.hf.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False, **kwargs)
        except Exception as exc:  # jinja's TemplateError from raise_exception(), or a template's own bug
            raise ChatTemplateError(str(exc) or type(exc).__name__) from None

    @cached_property
    def renders_tools(self) -> bool:
        """Whether the chat template reads `tools`, i.e. shows the model the functions it may call."""
        if self.chat_template is None:
            return False
        sources = list(self.chat_template.values()) if isinstance(self.chat_template, dict) else [self.chat_template]
        return any(_reads_variable(source, "tools") for source in sources)

    def token_bytes_of(self, token_id: int) -> list[int]:
        """One token's UTF-8 bytes, as chat logprobs give them."""
        if self.token_bytes is not None:
            return list(self.token_bytes[token_id])
        return list(self.decode([token_id]).encode("utf-8"))

    def token_text(self, token_id: int) -> str:
        """One token as logprobs show it; bytes that are not whole UTF-8 as `bytes:\\x..`."""
        if self.token_bytes is None:
            return self.decode([token_id])
        raw = self.token_bytes[token_id]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def document_start(self) -> list[int]:
        """What an empty prompt becomes: the start-of-document token (OpenAI: <|endoftext|>)."""
        token = self.bos_token_id if self.bos_token_id is not None else self.eos_token_id
        return [token] if token is not None else [0]

    def encode_fim(self, prefix: list[int], suffix: str) -> list[int]:
        """A prefix-suffix-middle prompt for fill-in-the-middle models, from the prefix's ids."""
        assert self.fim is not None
        bos = self.encode("", add_special_tokens=True)
        middle = self.encode(suffix, add_special_tokens=False)
        return [*bos, self.fim.prefix, *prefix, self.fim.suffix, *middle, self.fim.middle]


def _byte_level_table(hf_tokenizer) -> list[bytes] | None:
    """Each token's bytes, for byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM2)."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        return None
    to_byte = _unicode_to_byte()
    added = {i: t.content for i, t in hf_tokenizer.added_tokens_decoder.items()}
    table = []
    for token_id, piece in enumerate(hf_tokenizer.convert_ids_to_tokens(range(len(hf_tokenizer)))):
        if token_id in added:
            table.append(added[token_id].encode())
        elif piece is None or any(c not in to_byte for c in piece):
            return None  # not the byte-level alphabet after all
        else:
            table.append(bytes(to_byte[c] for c in piece))
    return table


def _fast_encoder(hf_tokenizer, token_bytes: list[bytes] | None, single_bytes: bytes) -> fast_bpe.FastEncoder | None:
    """tiktoken when it gives the same ids as the HF tokenizer on the check sample, else None."""
    if token_bytes is None:
        return None
    try:
        fast = fast_bpe.build(hf_tokenizer, token_bytes)
    except fast_bpe.UnsupportedTokenizer as exc:
        log.info("tiktoken cannot express this tokenizer (%s); using the Hugging Face tokenizer", exc)
        return None
    sample = [t for t in fast_bpe.load_sample(hf_tokenizer) if not t.encode().translate(None, single_bytes)]
    differ = fast_bpe.mismatches(fast, hf_tokenizer, sample)
    if differ:
        log.warning("tiktoken and the Hugging Face tokenizer differ on %d sample texts (first: %r); using Hugging Face", len(differ), differ[0][:60])
        return None
    return fast


def _prefix_length(hf_tokenizer) -> int:
    """How many ids the post-processor puts before a text (1 for a BOS)."""
    try:
        return len(fast_bpe.special_affixes(hf_tokenizer)[0])
    except fast_bpe.UnsupportedTokenizer:
        return 0


def _special_ids(hf_tokenizer) -> frozenset[int]:
    """Ids of the special tokens (BOS, EOS, chat markers): what skip_special_tokens leaves out."""
    ids = {i for i, token in hf_tokenizer.added_tokens_decoder.items() if token.special}
    return frozenset(ids | set(hf_tokenizer.all_special_ids))


def _single(token_bytes: list[bytes]) -> bytes:
    return bytes(sorted({b[0] for b in token_bytes if len(b) == 1}))


def _find_fim(hf_tokenizer) -> FimTokens | None:
    """The first FIM spelling whose three tokens all exist as single tokens."""
    vocab = hf_tokenizer.get_vocab()
    for spelling in FIM_SPELLINGS:
        if all(s in vocab for s in spelling):
            return FimTokens(*(vocab[s] for s in spelling))
    return None


def _reads_variable(template: str, name: str) -> bool:
    """Whether a Jinja template reads a variable it does not set (by its syntax tree; by a word search if jinja cannot parse it)."""
    import jinja2
    import jinja2.meta

    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError:  # a tag of transformers' own ({% generation %}): fall back to the word
        return re.search(rf"\b{name}\b", template) is not None
    return name in jinja2.meta.find_undeclared_variables(ast)
