"""Configuration: one frozen dataclass per concern; the command line is derived from them."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field


def _opt(default, help: str, **extra):
    """A field that is also a command-line option."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class EngineConfig:
    """What model to load, and how."""

    model: str | None = _opt(None, "a model directory, a .gguf file, a cached model or a hub id (default: SmolLM2-135M-Instruct)")
    dtype: str = _opt("auto", "weights dtype; auto: float32 on CPU, bfloat16 on CUDA", choices=("auto", "float32", "bfloat16", "float16"))
    device: str = _opt("auto", "where the model runs; auto: CUDA when there is one", choices=("auto", "cpu", "cuda"))
    max_model_len: int | None = _opt(None, "context length in tokens (default: the model's, capped so one sequence fits the KV cache)")
    max_num_seqs: int = _opt(256, "most sequences in one step (and in one request: prompts x best_of)")
    max_num_batched_tokens: int = _opt(512, "most tokens in one step: decodes plus prompt chunks")
    kv_cache_memory: str | None = _opt(None, "KV cache size: bytes or a size such as 512MiB or 2GiB (default: a quarter of free memory, at most 2GiB)")
    block_size: int = _opt(16, "tokens per KV cache block")
    no_prefix_caching: bool = _opt(False, "do not reuse the cached keys and values of a prompt prefix seen before")
    no_batch_invariance: bool = _opt(False, "do not pad steps to 16 rows where the model needs it (MKL matmuls): faster "
                                            "below 16 sequences, but a request's tokens may then depend on what else runs")

    def __post_init__(self):
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("--max-model-len must be a positive number of tokens")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.kv_cache_memory is not None:
            parse_size(self.kv_cache_memory)

    @property
    def kv_cache_bytes(self) -> int | None:
        """--kv-cache-memory in bytes (None: the default)."""
        return None if self.kv_cache_memory is None else parse_size(self.kv_cache_memory)


@dataclass(frozen=True)
class ServerConfig:
    """How the HTTP server listens and whom it answers."""

    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(8000, "port to listen on")
    served_model_name: str | None = _opt(None, "the model name clients send (default: --model as given)")
    api_key: str | None = _opt(None, "require `Authorization: Bearer KEY` on /v1/* (or set TOKENMILL_API_KEY)")

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError("--port must be between 0 and 65535")


SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
              "g": 1024**3, "gib": 1024**3, "gb": 1000**3}


def parse_size(text: str) -> int:
    """A number of bytes, written plainly or with a unit: 536870912, 512MiB, 2GiB, 1.5GB."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise ValueError(f"'{text}' is not a size: write bytes, or a number with KiB, MiB or GiB (or KB, MB, GB)")
    size = int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])
    if size < 1:
        raise ValueError(f"'{text}' is not a positive size")
    return size


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """Add one --option per field of a config dataclass (a bool field is a flag)."""
    for f in dataclasses.fields(cls):
        flag, helptext = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, action="store_true", help=helptext)
            continue
        kind = int if "int" in str(f.type) else str
        extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=helptext, **extra)


def from_args(cls, args: argparse.Namespace, **overrides):
    """Build a config dataclass from parsed options."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{**values, **overrides})


def api_key_from_env(configured: str | None) -> str | None:
    """--api-key wins over TOKENMILL_API_KEY; empty means none."""
    return configured or os.environ.get("TOKENMILL_API_KEY") or None
