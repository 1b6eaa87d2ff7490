"""The fast tokenizer: tiktoken built from the model's vocabulary gives the HF tokenizer's ids."""

import glob
import json
import logging
import os
import shutil
import sysconfig

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tokenmill.tokenizer import Tokenizer as TokenmillTokenizer
from tokenmill.tokenizer import UnencodableText

LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "plain ascii text, with punctuation!?",
    "unicode: naïve café 日本語 한국어 русский العربية 🙂👩‍👩‍👧 🇫🇷",
    "whitespace runs:   \t\t  \n\n\n   \r\n \u00a0\u2003 end  ",
    "digits 0 7 42 123 4567 89012 3.14 1e10 -5 v2.0.1 ٣٤٥ ½",
    "  1\n  22\n\t333\n    4444",
    "x1y22z333",
    "special <|endoftext|> inside<|im_start|>text<|im_end|> and <|endoftext|><|endoftext|>",
    "partial specials <|endoftext| <|im_ and |>",
    "contractions don't won't I'm we'll they've she'd IT'S",
    "",
    " ",
    "\n",
    "code:\n    def f(x: int) -> int:\n        return x ** 2  # comment\n",
    "a" * 500,
    "🙂" * 50,
    "\x00\x01\x7f control",
]


def stdlib_text(files: int = 8) -> list[str]:
    paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[40 : 40 + files]
    return [open(p, encoding="utf-8").read() for p in paths]


def build(pre_tokenizer, post_processor=None, normalizer=None) -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained with the given pre-tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    if normalizer is not None:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stdlib_text(20) + CORPUS, trainer)
    if post_processor is not None:
        tok.post_processor = post_processor
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def GPT2_STYLE():
    return build(pre_tokenizers.ByteLevel(add_prefix_space=False))


def DIGITS():
    return build(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]))


def LLAMA3_STYLE():
    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
    return build(pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))


def WITH_BOS():
    bos = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    return build(pre_tokenizers.ByteLevel(add_prefix_space=False), bos)


@pytest.mark.parametrize("make", [GPT2_STYLE, DIGITS, LLAMA3_STYLE, WITH_BOS], ids=["gpt2", "digits", "llama3", "bos"])
def test_tiktoken_gives_the_hf_ids(make):
    hf = make()
    tok = TokenmillTokenizer(hf)
    assert tok.name == "tiktoken"
    for text in CORPUS + stdlib_text():
        for special in (True, False):
            assert tok.encode(text, special) == hf.encode(text, add_special_tokens=special), text[:80]


def test_bos_comes_from_the_post_processor():
    hf = WITH_BOS()
    tok = TokenmillTokenizer(hf)
    assert tok.encode("hi")[0] == 0 and tok.encode("hi", add_special_tokens=False)[0] != 0


def test_decode_roundtrips(llama_dir):
    from transformers import AutoTokenizer

    tok = TokenmillTokenizer(AutoTokenizer.from_pretrained(llama_dir))
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == text


def test_a_tokenizer_tiktoken_cannot_express_falls_back(caplog):
    hf = build(pre_tokenizers.ByteLevel(add_prefix_space=False), normalizer=normalizers.Lowercase())
    with caplog.at_level(logging.INFO):
        tok = TokenmillTokenizer(hf)
    assert tok.name == "huggingface" and "tiktoken cannot express" in caplog.text
    assert tok.encode("Hello World") == hf.encode("Hello World")


def test_fast_path_can_be_turned_off():
    assert TokenmillTokenizer(GPT2_STYLE(), fast=False).name == "huggingface"


def test_text_the_vocabulary_cannot_spell_is_refused():
    hf = GPT2_STYLE()
    tok = TokenmillTokenizer(hf)
    tok._single_bytes = tok._single_bytes.replace(b"\x04", b"")  # as in SmolLM2, which lacks 21 bytes
    with pytest.raises(UnencodableText, match="U\\+0004 at character 3"):
        tok.encode("abc\x04def")
    with pytest.raises(UnencodableText, match="surrogate"):
        tok.encode("x\ud800")
    assert tok.encode("abc") == hf.encode("abc")


def test_a_pre_tokenizer_transformers_rebuilds_away_is_restored(llama_dir, tmp_path):
    # Hub repositories such as SmolLM2's name tokenizer_class GPT2Tokenizer; transformers 5 then
    # rebuilds the pre-tokenizer and drops tokenizer.json's Digits split.
    from tokenmill.config import EngineConfig
    from tokenmill.engine.loader import load_engine

    model_dir = tmp_path / "model"
    shutil.copytree(llama_dir, model_dir)
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    raw.save(str(model_dir / "tokenizer.json"))
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    tokenizer = load_engine(EngineConfig(model=str(model_dir)), str(model_dir), "digits").tokenizer
    for text in ["x = 12345 + 678", *CORPUS]:
        assert tokenizer.encode(text, add_special_tokens=False) == raw.encode(text, add_special_tokens=False).ids, text


@pytest.mark.parametrize("fixture", ["llama_dir", "metaspace_llama_dir"])
def test_no_text_takes_fewer_tokens_than_its_length_over_the_longest_token(fixture, request):
    # The server refuses huge prompts before tokenizing them on this bound; it must never refuse one that fits.
    from transformers import AutoTokenizer

    tok = TokenmillTokenizer(AutoTokenizer.from_pretrained(request.getfixturevalue(fixture)))
    assert 1 < tok.max_token_chars < 100
    longest = max(range(tok.vocab_size), key=lambda i: len(tok.decode([i])))
    for text in CORPUS + stdlib_text() + [tok.decode([longest]) * 50]:
        assert len(text) <= tok.max_token_chars * len(tok.encode(text, add_special_tokens=False)), text[:80]
