"""Configuration: one frozen dataclass per concern; the command line is derived from them."""

from __future__ import annotations

import argparse
import dataclasses
import os
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
    max_model_len: int | None = _opt(None, "context length in tokens (default: the model's)")

    def __post_init__(self):
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("--max-model-len must be a positive number of tokens")


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


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """Add one --option per field of a config dataclass."""
    for f in dataclasses.fields(cls):
        kind = int if "int" in str(f.type) else str
        extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=f.default, help=f.metadata["help"], **extra)


def from_args(cls, args: argparse.Namespace, **overrides):
    """Build a config dataclass from parsed options."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{**values, **overrides})


def api_key_from_env(configured: str | None) -> str | None:
    """--api-key wins over TOKENMILL_API_KEY; empty means none."""
    return configured or os.environ.get("TOKENMILL_API_KEY") or None
