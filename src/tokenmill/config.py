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
    kv_cache_dtype: str = _opt(
        "auto",
        "the KV cache's element type; auto: the weights' dtype. float16 or bfloat16 under float32 weights halve the bytes "
        "attention reads and double the tokens the cache holds, but the numbers are no longer the model's own (prompt "
        "logprobs move by up to ~0.01 with float16, ~0.06 with bfloat16, on SmolLM2-135M, where float32 keeps them within 1e-4)",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    block_size: int = _opt(16, "tokens per KV cache block")
    no_prefix_caching: bool = _opt(False, "do not reuse the cached keys and values of a prompt prefix seen before")
    chat_template: str | None = _opt(None, "a Jinja chat template file for /v1/chat/completions, instead of the model's own")
    attention: str = _opt(
        "auto",
        "the CPU's C++ kernels (decode and prompt attention; in llama and qwen2 models RoPE with the K/V write, and the "
        "residual add with RMSNorm): "
        "auto (compiled for this machine at first start, when a compiler is found; else torch ops) or torch",
        choices=("auto", "torch"),
    )
    model_impl: str = _opt(
        "auto",
        "auto: llama and qwen2 models run through tokenmill's own forward pass (same numbers, less Python a layer), "
        "others through transformers' modules; transformers: every model through transformers' modules",
        choices=("auto", "transformers"),
    )
    argmax_screen: str = _opt(
        "auto",
        "greedy rows that report no logprobs: the lm_head first in bfloat16, then the exact float32 logits of only the "
        "columns that can still be the argmax (the same tokens; csrc/matmul.cpp's screened_logits); auto: where the CPU "
        "runs the screen in AMX tiles (there it takes ~0.4x the float32 lm_head's time at 64 rows), on: also in AVX512-BF16 "
        "vectors (slower than float32: for tests), off",
        choices=("auto", "on", "off"),
    )
    no_batch_invariance: bool = _opt(
        False,
        "do not pad steps to 16 rows where the model needs it (MKL matmuls), and run steps of 1-4 rows of "
        "llama-family models on the CPU through a compiled matrix-vector loop (no faster than the default on "
        "the machines measured); a request's tokens may then depend on what else runs",
    )

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
    """How the HTTP server listens, whom it answers, and the limits that keep it standing."""

    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(8000, "port to listen on")
    served_model_name: str | None = _opt(None, "the model name clients send (default: --model as given)")
    api_key: tuple[str, ...] = _opt(
        (),
        "require `Authorization: Bearer KEY` on /v1/* and the docs; repeat the flag or give a comma list for several keys (or set TOKENMILL_API_KEY)",
        action="append",
    )
    api_key_file: str | None = _opt(None, "a file of API keys, one a line (added to --api-key)")
    protect_metrics: bool = _opt(False, "require the API key on /metrics too")
    allowed_origins: str | None = _opt(None, "comma list of origins allowed by CORS (`*` for any; default: CORS off)")
    max_queued_requests: int = _opt(256, "most requests waiting for the engine; beyond it, 429 with Retry-After")
    max_request_bytes: str = _opt("32MiB", "largest request body: bytes or a size such as 32MiB; larger is a 413")
    request_timeout: float | None = _opt(None, "seconds a request may run before it ends with an error (default: no limit)")
    stream_stall_timeout: float = _opt(60.0, "seconds a stream may go unread (its generation paused) before it is aborted")
    sse_keepalive: float | None = _opt(
        None, "seconds between `: ping` comment lines on idle streams, for proxies that cut quiet connections (default: none, as OpenAI sends streams)"
    )
    tool_call_parser: str = _opt(
        "hermes",
        "how chat replies with tool_choice 'auto' write tool calls: hermes (<tool_call> JSON, as Qwen2.5 and Hermes models do), or none (then 'auto' is a 400)",
        choices=("hermes", "none"),
    )
    shutdown_timeout: float = _opt(30.0, "seconds in-flight requests get to finish after SIGTERM before they end with an error")

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError("--port must be between 0 and 65535")
        object.__setattr__(self, "api_key", _split_keys(self.api_key))
        if self.max_queued_requests < 0:
            raise ValueError("--max-queued-requests must be 0 or more")
        parse_size(self.max_request_bytes)
        for name in ("request_timeout", "stream_stall_timeout", "shutdown_timeout", "sse_keepalive"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number of seconds")

    @property
    def request_bytes(self) -> int:
        return parse_size(self.max_request_bytes)

    @property
    def origins(self) -> list[str]:
        return [o.strip() for o in (self.allowed_origins or "").split(",") if o.strip()]


def _split_keys(keys) -> tuple[str, ...]:
    """Keys given as one string, a comma list, or several of either -> a tuple of non-empty keys."""
    if keys is None:
        return ()
    if isinstance(keys, str):
        keys = [keys]
    return tuple(k.strip() for entry in keys for k in entry.split(",") if k.strip())


SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2, "mb": 1000**2, "g": 1024**3, "gib": 1024**3, "gb": 1000**3}


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
        if f.metadata.get("action") == "append":
            parser.add_argument(flag, dest=f.name, action="append", default=[], help=helptext)
            continue
        kind = int if "int" in str(f.type) else float if "float" in str(f.type) else str
        extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=helptext, **extra)


def from_args(cls, args: argparse.Namespace, **overrides):
    """Build a config dataclass from parsed options."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{**values, **overrides})


def api_keys_from(flags: list[str] | tuple[str, ...], key_file: str | None) -> tuple[str, ...]:
    """Every accepted key: --api-key (repeated or comma lists), --api-key-file, else TOKENMILL_API_KEY.

    Raises ValueError when the key file cannot be read.
    """
    keys = list(_split_keys(tuple(flags)))
    if key_file:
        try:
            with open(key_file, encoding="utf-8") as f:
                keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except OSError as exc:
            raise ValueError(f"--api-key-file {key_file}: {exc.strerror or exc}") from None
        if not keys:
            raise ValueError(f"--api-key-file {key_file} holds no key")
    if not keys:
        keys = list(_split_keys(os.environ.get("TOKENMILL_API_KEY")))
    return tuple(keys)
