"""Load a transformers causal LM and its tokenizer, and build the engine around them."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tokenmill.config import EngineConfig
from tokenmill.engine import host_memory, native
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.attention import AttentionBackend, NativeAttention
from tokenmill.engine.engine import Engine
from tokenmill.engine.gguf import load_gguf
from tokenmill.engine.kv_cache import BlockManager
from tokenmill.engine.model_runner import KVShape, ModelRunner
from tokenmill.engine.scheduler import SchedulerConfig
from tokenmill.outputs import ModelInfo
from tokenmill.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_KV_CAP = 2 * 1024**3  # several servers share a machine in tests and development


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
    """An engine thread serving the model at `model_path`, loaded in that thread."""
    return AsyncEngine(lambda: build_engine(config, model_path, served_name))


def build_engine(config: EngineConfig, model_path: str, served_name: str) -> tuple[Engine, ModelInfo]:
    """Load weights and tokenizer from `model_path` and build the engine, in the calling thread."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cpu":
        host_memory.keep_freed_memory()
    model, hf_tokenizer = _load(model_path, dtype, device)
    max_len = _context_length(model.config, config.max_model_len)
    kv_dtype = dtype if config.kv_cache_dtype == "auto" else DTYPES[config.kv_cache_dtype]
    num_blocks, max_len = _kv_blocks(config, KVShape.of(model.config, kv_dtype), max_len, device)
    tokenizer = Tokenizer(hf_tokenizer, model.config.vocab_size, chat_template=read_chat_template(config.chat_template))
    eos = _eos_ids(model, tokenizer)
    info = ModelInfo(
        name=served_name,
        source=model_path,
        max_model_len=max_len,
        parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        tokenizer=tokenizer.name,
        max_request_sequences=config.max_num_seqs,
        kv_cache_dtype=None if kv_dtype == dtype else str(kv_dtype).removeprefix("torch."),
    )
    blocks = BlockManager(num_blocks, config.block_size, prefix_caching=not config.no_prefix_caching)
    backend, llama_ops, matmul = _kernels(config, device, dtype)
    invariant = not config.no_batch_invariance
    runner = ModelRunner(model, device, num_blocks, config.block_size, invariant, backend, config.model_impl, llama_ops, matmul, kv_dtype, config.argmax_screen)
    scheduling = SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens)
    return Engine(runner, tokenizer, eos, blocks, scheduling), info


def _kernels(config: EngineConfig, device: torch.device, dtype: torch.dtype) -> tuple[AttentionBackend | None, Any, Any]:
    """The compiled CPU kernels on a float32 CPU model (--attention auto), each where it builds, else None: the attention
    backend (else torch ops), the llama layer's ops (RoPE with the K/V write, residual add with RMSNorm; else torch ops)
    and the batch-invariant matmul (engine/linear.py; else oneDNN)."""
    cache = _kernel_cache(config, device, dtype)
    if cache is None:
        return None, None, None
    attention = native.load_paged_attention(cache)
    backend = NativeAttention(attention) if attention is not None else None
    return backend, native.load_llama_ops(cache), native.load_matmul(cache)


def _kernel_cache(config: EngineConfig, device: torch.device, dtype: torch.dtype) -> Path | None:
    """Where compiled CPU kernels live, or None where none is used (--attention torch, CUDA, not float32)."""
    if config.attention != "auto" or device.type != "cpu" or dtype != torch.float32:
        return None
    from tokenmill.models.cache import default_home

    return default_home()


def read_chat_template(path: str | None) -> str | None:
    """The text of --chat-template FILE, compiled once so that a broken template stops the start, not each request."""
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"--chat-template {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template  # private, so only a check
    except ImportError:
        return text
    try:
        _compile_jinja_template(text)
    except Exception as exc:  # jinja2's TemplateSyntaxError
        raise ModelLoadError(f"--chat-template {path} is not a valid Jinja template: {exc}") from None
    return text


def _kv_blocks(config: EngineConfig, shape: KVShape, max_len: int, device: torch.device) -> tuple[int, int]:
    """Blocks in the KV pool, and the context length capped so that one sequence always fits."""
    per_block = shape.bytes_per_token * config.block_size
    useful = config.max_num_seqs * max_len * shape.bytes_per_token  # more than this is never used
    budget = config.kv_cache_bytes or min(_default_kv_bytes(device), useful)
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise ModelLoadError(f"--kv-cache-memory {budget} bytes holds no block: one block of {config.block_size} tokens takes {per_block} bytes")
    if num_blocks * config.block_size < max_len:
        log.warning("the KV cache holds %d tokens: context length capped from %d", num_blocks * config.block_size, max_len)
        max_len = num_blocks * config.block_size
    log.info(
        "KV cache: %.1f MiB of %s, %d blocks of %d tokens = %d tokens (%d bytes per token)",
        num_blocks * per_block / 2**20,
        str(shape.dtype).removeprefix("torch."),
        num_blocks,
        config.block_size,
        num_blocks * config.block_size,
        shape.bytes_per_token,
    )
    return num_blocks, max_len


def _default_kv_bytes(device: torch.device) -> int:
    """A quarter of the memory free now (the device's, or the machine's), at most DEFAULT_KV_CAP."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = _available_memory()
    return min(free // 4, DEFAULT_KV_CAP)


def _available_memory() -> int:
    """MemAvailable from /proc/meminfo; the cap where there is none."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * DEFAULT_KV_CAP


def _load(path: str, dtype: torch.dtype, device: torch.device):
    """from_pretrained for a directory or a .gguf file, with errors a person can read."""
    first = Path(path) if path.endswith(".gguf") else Path(path) / "config.json"
    try:
        found = first.is_file()
        readable = found and os.access(first, os.R_OK)
    except OSError as exc:  # a folder this user may not enter (a volume mounted for another uid)
        raise ModelLoadError(f"cannot read {path} as uid {os.getuid()}: {exc.strerror}") from None
    if found and not readable:
        raise ModelLoadError(f"cannot read {first} as uid {os.getuid()}: permission denied")
    if path.endswith(".gguf") and not found:
        raise ModelLoadError(f"GGUF file not found: {path}")
    if not found:
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
