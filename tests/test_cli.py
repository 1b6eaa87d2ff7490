"""The command line: clear failures, and `tokenmill serve` as a user runs it."""

import os
import subprocess
import sys

import httpx
import pytest

from tests.conftest import free_port, wait_healthy


def tokenmill(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "tokenmill", *args], capture_output=True, text=True, timeout=120, **kwargs)


def test_help_shows_every_default_and_version_says_which():
    text = " ".join(tokenmill("serve", "--help").stdout.split())
    for option, default in (
        ("--host HOST", "127.0.0.1"),
        ("--port PORT", "8000"),
        ("--log-level", "info"),
        ("--max-num-seqs MAX_NUM_SEQS", "256"),
        ("--max-request-bytes MAX_REQUEST_BYTES", "32MiB"),
    ):
        after = text.split(f" {option} ", 1)[1]
        assert f"(default: {default})" in after.split(" --", 1)[0], option
    from tokenmill import __version__

    assert tokenmill("--version").stdout.strip() == f"tokenmill {__version__}"


def test_a_missing_model_is_a_clear_error(tmp_path):
    result = tokenmill("serve", "--model", str(tmp_path / "nowhere.gguf"))
    assert result.returncode != 0
    assert "not found" in result.stderr and "Traceback" not in result.stderr


def test_a_model_this_user_cannot_read_is_a_clear_error(tmp_path, monkeypatch):
    # As in a container whose model volume belongs to another uid (a test run as root reads everything, so
    # the two ways a read is refused are made here).
    from pathlib import Path

    from tokenmill.config import EngineConfig
    from tokenmill.engine.loader import ModelLoadError, build_engine

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(os, "access", lambda *args: False)  # config.json is there, but not readable
    with pytest.raises(ModelLoadError, match="cannot read .*config.json as uid .*: permission denied"):
        build_engine(EngineConfig(), str(tmp_path), "x")

    def refused(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "is_file", refused)  # the folder itself cannot be entered
    with pytest.raises(ModelLoadError, match="cannot read .* as uid .*: Permission denied"):
        build_engine(EngineConfig(), str(tmp_path), "x")


def test_a_directory_without_a_model_is_a_clear_error(tmp_path):
    result = tokenmill("serve", "--model", str(tmp_path))
    assert result.returncode != 0
    assert "config.json" in result.stderr and "Traceback" not in result.stderr


def test_an_unreadable_model_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    result = tokenmill("serve", "--model", str(tmp_path))
    assert result.returncode != 0 and "could not load" in result.stderr and "Traceback" not in result.stderr


def test_bad_options_are_refused(tmp_path):
    assert tokenmill("serve", "--model", str(tmp_path), "--dtype", "int3").returncode == 2
    assert tokenmill("serve", "--model", str(tmp_path), "--max-model-len", "0").returncode == 2


def test_models_lists_an_empty_cache(tmp_path):
    result = tokenmill("models", env={**os.environ, "TOKENMILL_HOME": str(tmp_path)})
    assert result.returncode == 0 and "no models cached" in result.stdout


def test_pull_of_a_missing_gguf_is_a_clear_error(tmp_path):
    result = tokenmill("pull", str(tmp_path / "missing.gguf"), env={**os.environ, "TOKENMILL_HOME": str(tmp_path)})
    assert result.returncode == 1 and "GGUF file not found" in result.stderr and "Traceback" not in result.stderr


def test_an_uncached_hub_model_offline_is_a_clear_error(tmp_path):
    env = {**os.environ, "TOKENMILL_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = tokenmill("serve", "--model", "someorg/somemodel", env=env)
    assert result.returncode == 1 and "cannot be reached" in result.stderr and "Traceback" not in result.stderr


def test_help_lists_every_option():
    out = tokenmill("serve", "--help").stdout
    for option in ("--model", "--host", "--port", "--served-model-name", "--api-key", "--dtype", "--device", "--max-model-len", "--log-level"):
        assert option in out


@pytest.mark.slow
def test_serve_as_a_user_runs_it(llama_dir):
    port = free_port()
    env = {**os.environ, "TOKENMILL_API_KEY": "sk-env"}
    cmd = [sys.executable, "-m", "tokenmill", "serve", "--model", str(llama_dir), "--port", str(port), "--served-model-name", "tiny", "--max-model-len", "128"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, 90, proc)
        headers = {"Authorization": "Bearer sk-env"}
        models = httpx.get(url + "/v1/models", headers=headers).json()
        assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 128
        out = httpx.post(url + "/v1/completions", headers=headers, json={"model": "tiny", "prompt": "x", "max_tokens": 3}).json()
        assert out["usage"]["completion_tokens"] <= 3
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    assert "parameters" in log and "float32 on cpu" in log and "context 128 tokens" in log
