"""GGUF files through transformers' GGUF support: load (dequantized), or convert once to safetensors."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger(__name__)

# llama.cpp pre-tokenizers that split every digit off before GPT-2's byte-level regex.
# transformers' GGUF conversion drops this, so "  1" would tokenize unlike the model's training.
DIGIT_SPLITTING = {"smollm"}


def gguf_pre_tokenizer(path: Path) -> str | None:
    """The file's `tokenizer.ggml.pre` (llama.cpp's name for its pre-tokenizer), if any."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
    return None if field is None else bytes(field.parts[field.data[0]]).decode()


def restore_pre_tokenizer(hf_tokenizer, path: Path) -> None:
    """Put back the digit splitting that the GGUF conversion lost."""
    name = gguf_pre_tokenizer(path)
    if name in DIGIT_SPLITTING:
        hf_tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
        log.info("restored the %r pre-tokenizer (digits split one by one) that the GGUF conversion drops", name)


def load_gguf(path: Path, dtype: torch.dtype):
    """Model (dequantized to `dtype`) and tokenizer from a .gguf file."""
    path = Path(path)
    source, name = str(path.parent), path.name
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    restore_pre_tokenizer(tokenizer, path)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=dtype)
    log.info("loaded %s and dequantized it to %s in %.0f s", name, str(dtype).removeprefix("torch."), time.time() - started)
    return model, tokenizer


def convert_gguf(path: Path, out_dir: Path) -> None:
    """Write a .gguf file out as an ordinary transformers directory (float32 safetensors)."""
    log.info("converting %s to a transformers directory (dequantizing to float32)", Path(path).name)
    started = time.time()
    model, tokenizer = load_gguf(path, torch.float32)
    model.hf_quantizer = None  # save_pretrained refuses a model that still says it is GGUF-quantized
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log.info("converted in %.0f s", time.time() - started)
