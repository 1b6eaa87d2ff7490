"""Load a transformers causal LM and its tokenizer, and build the engine around them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tokenmill.config import EngineConfig
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.engine import Engine
from tokenmill.engine.gguf import load_gguf
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.outputs import ModelInfo
from tokenmill.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why, for a person."""


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when there is one."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: float32 on the CPU (fastest there), bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_engine(config: EngineConfig, model_path: str, served_name: str) -> AsyncEngine:
    """Load weights and tokenizer from `model_path` and wrap them in a ready engine."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model, hf_tokenizer = _load(model_path, dtype, device)
    max_len = _context_length(model.config, config.max_model_len)
    tokenizer = Tokenizer(hf_tokenizer, model.config.vocab_size)
    eos = _eos_ids(model, tokenizer)
    info = ModelInfo(
        name=served_name,
        source=model_path,
        max_model_len=max_len,
        parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        tokenizer=tokenizer.name,
    )
    return AsyncEngine(Engine(ModelRunner(model, device), tokenizer, eos), info)


def _load(path: str, dtype: torch.dtype, device: torch.device):
    """from_pretrained for a directory or a .gguf file, with errors a person can read."""
    if path.endswith(".gguf") and not Path(path).is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    if not path.endswith(".gguf") and not (Path(path) / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a transformers model directory (no config.json)")
    try:
        if path.endswith(".gguf"):
            model, tokenizer = load_gguf(Path(path), dtype)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path)
            keep_file_pre_tokenizer(tokenizer, Path(path) / "tokenizer.json")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        raise ModelLoadError(f"could not load the model from {path}: {exc}") from exc
    return model.to(device).eval(), tokenizer


def keep_file_pre_tokenizer(hf_tokenizer, tokenizer_json: Path) -> None:
    """Use tokenizer.json's own pre-tokenizer; transformers 5 rebuilds some (GPT2Tokenizer) without it."""
    if not tokenizer_json.is_file() or not hasattr(hf_tokenizer, "backend_tokenizer"):
        return
    from tokenizers import Tokenizer as RawTokenizer

    raw = RawTokenizer.from_file(str(tokenizer_json))
    wanted = json.loads(raw.to_str()).get("pre_tokenizer")
    if json.loads(hf_tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") != wanted and raw.pre_tokenizer is not None:
        hf_tokenizer.backend_tokenizer.pre_tokenizer = raw.pre_tokenizer
        log.warning("transformers rebuilt the tokenizer's pre-tokenizer; restored the one in %s", tokenizer_json)


def _context_length(model_config, requested: int | None) -> int:
    """The model's context length, or a shorter one the operator asked for."""
    native = getattr(model_config, "max_position_embeddings", None) or 2048
    if requested is None:
        return native
    if requested > native:
        raise ModelLoadError(f"--max-model-len {requested} is longer than the model's context ({native} tokens)")
    return requested


def _eos_ids(model, tokenizer: Tokenizer) -> tuple[int, ...]:
    """Every token that ends a sequence: the generation config's and the tokenizer's."""
    ids = set()
    config = getattr(model, "generation_config", None) or GenerationConfig()
    eos = config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))
