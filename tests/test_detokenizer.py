"""Incremental detokenization: deltas add up to the whole text, and no character is split."""

from tokenmill.engine.detokenizer import Detokenizer
from tokenmill.tokenizer import Tokenizer


def tokenizer(llama_dir):
    from transformers import AutoTokenizer

    return Tokenizer(AutoTokenizer.from_pretrained(llama_dir))


TEXTS = ["def f(x):\n    return x  # ok", "héllo wörld — ünïcode ✓ 日本語 🙂🙂", "  spaces\t\tand\n\n\nnewlines  "]


def test_deltas_add_up_to_the_full_decode(llama_dir):
    tok = tokenizer(llama_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        detok = Detokenizer(tok.decode)
        pieces = [detok.add(i) for i in ids] + [detok.flush()]
        assert "".join(pieces) == tok.decode(ids) == text


def test_no_delta_holds_half_a_character(llama_dir):
    tok = tokenizer(llama_dir)
    ids = tok.encode("🙂日本")
    assert len(ids) > 3  # multi-byte characters span several tokens in a 1k vocabulary
    detok = Detokenizer(tok.decode)
    assert all("\ufffd" not in detok.add(i) for i in ids)


def test_context_keeps_the_first_deltas_spacing(llama_dir):
    tok = tokenizer(llama_dir)
    ids = tok.encode("return value")
    split = len(tok.encode("return"))
    detok = Detokenizer(tok.decode, ids[:split])
    assert "".join(detok.add(i) for i in ids[split:]) + detok.flush() == tok.decode(ids[split:])


def test_flush_returns_an_unfinished_character(llama_dir):
    tok = tokenizer(llama_dir)
    smile = "🙂".encode()
    first = next(i for i in range(tok.vocab_size) if tok.token_bytes[i] == smile[:1])
    detok = Detokenizer(tok.decode)
    assert detok.add(first) == ""
    assert detok.flush() == "\ufffd"


def test_token_text_marks_partial_utf8(llama_dir):
    tok = tokenizer(llama_dir)
    lead = next(i for i in range(tok.vocab_size) if tok.token_bytes[i] == b"\xf0")
    assert tok.token_text(lead) == "bytes:\\xf0"
