"""The Hugging Face Hub path of `tokenmill pull` and `serve`, against a hub on 127.0.0.1."""

import os
import shutil
import subprocess
import sys

import httpx
import pytest

from tests.conftest import free_port, serve
from tests.fake_hub import FakeHub

pytestmark = pytest.mark.slow  # each case starts the CLI in a fresh interpreter (~3 s)


def tokenmill(home, hub_url: str, *args):
    env = {**os.environ, "TOKENMILL_HOME": str(home / "tokenmill"), "HF_HOME": str(home / "hf"), "HF_ENDPOINT": hub_url}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-m", "tokenmill", *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def hub(llama_dir, tmp_path):
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(llama_dir / "config.json", no_weights)
    repos = {"someorg/tiny": llama_dir, "HuggingFaceTB/SmolLM2-135M-Instruct": llama_dir, "someorg/no-weights": no_weights}
    with FakeHub(repos) as fake:
        yield fake


def cached_files(home, name: str) -> dict[str, bytes]:
    root = home / "tokenmill" / "models" / name.replace("/", "--")
    return {p.name: p.read_bytes() for p in root.iterdir() if p.is_file() and p.name != "tokenmill-manifest.json"}


def test_pull_downloads_a_hub_model_into_the_cache(hub, llama_dir, tmp_path):
    result = tokenmill(tmp_path, hub.url, "pull", "someorg/tiny")
    assert result.returncode == 0, result.stderr
    listed = tokenmill(tmp_path, hub.url, "models").stdout
    assert "someorg/tiny" in listed and "hub:someorg/tiny" in listed
    originals = {p.name: p.read_bytes() for p in llama_dir.iterdir() if p.is_file()}
    assert cached_files(tmp_path, "someorg/tiny") == originals
    assert any("/resolve/" in r for r in hub.requests)


def test_the_default_model_comes_from_the_hub_when_it_answers(hub, tmp_path):
    result = tokenmill(tmp_path, hub.url, "pull")
    assert result.returncode == 0, result.stderr
    assert "hub:HuggingFaceTB/SmolLM2-135M-Instruct" in tokenmill(tmp_path, hub.url, "models").stdout


def test_a_hub_model_is_served_from_the_cache_once_pulled(hub, llama, tmp_path, monkeypatch):
    from tokenmill.models.cache import ModelCache
    from tokenmill.models.sources import resolve

    assert tokenmill(tmp_path, hub.url, "pull", "someorg/tiny").returncode == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # from now on the hub is never asked
    resolved = resolve("someorg/tiny", ModelCache(tmp_path / "tokenmill"))
    body = {"prompt": "def", "max_tokens": 8, "temperature": 0}
    for served in serve(resolved.path, resolved.name):
        mine = httpx.post(served.url + "/v1/completions", json={"model": "someorg/tiny", **body}, timeout=60).json()
    original = httpx.post(llama.url + "/v1/completions", json={"model": llama.model, **body}, timeout=60).json()
    assert mine["choices"][0]["text"] == original["choices"][0]["text"]


def test_a_hub_repository_without_weights_is_a_clear_error(hub, tmp_path):
    result = tokenmill(tmp_path, hub.url, "pull", "someorg/no-weights")
    assert result.returncode == 1 and "no safetensors weights" in result.stderr and "Traceback" not in result.stderr
    assert "someorg/no-weights" not in tokenmill(tmp_path, hub.url, "models").stdout


def test_an_unknown_hub_repository_is_a_clear_error(hub, tmp_path):
    result = tokenmill(tmp_path, hub.url, "serve", "--model", "someorg/missing")
    assert result.returncode == 1 and "has no such repository" in result.stderr and "Traceback" not in result.stderr


def test_a_hub_that_does_not_answer_is_a_clear_error(tmp_path):
    result = tokenmill(tmp_path, f"http://127.0.0.1:{free_port()}", "pull", "someorg/tiny")
    assert result.returncode == 1 and "cannot be reached" in result.stderr and "Traceback" not in result.stderr
