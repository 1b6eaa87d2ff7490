"""Finished model directories under $TOKENMILL_HOME, each vouched for by a manifest of its files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "tokenmill-manifest.json"
STALE_PARTIAL_SECONDS = 3600  # an unfinished build this old was interrupted


def default_home() -> Path:
    """$TOKENMILL_HOME, else ~/.cache/tokenmill."""
    return Path(os.environ.get("TOKENMILL_HOME") or Path.home() / ".cache" / "tokenmill")


@dataclass(frozen=True)
class Entry:
    """A cached model, as `tokenmill models` lists it."""

    name: str
    path: Path
    size: int
    source: str


class ModelCache:
    """A model is trusted only once it was built to a temporary name, hashed, and renamed."""

    def __init__(self, home: Path):
        self.root = Path(home) / "models"

    def path(self, name: str) -> Path:
        return self.root / name.replace("/", "--")

    def get(self, name: str) -> Path | None:
        """The verified directory of `name`, or None; a corrupt entry is removed."""
        path = self.path(name)
        if not path.exists():
            return None
        problem = verify(path)
        if problem is None:
            return path
        log.warning("cached %s is not usable (%s); it will be fetched again", name, problem)
        shutil.rmtree(path, ignore_errors=True)
        return None

    def ensure(self, name: str, build: Callable[[Path], str]) -> Path:
        """The cached `name`, built first if need be by `build(tmp_dir) -> source description`."""
        found = self.get(name)
        if found is not None:
            return found
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean_partials()
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{self.path(name).name}.partial-"))
        try:
            source = build(tmp)
            write_manifest(tmp, name, source)
            return self._publish(tmp, name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def entries(self) -> list[Entry]:
        """Every model in the cache with a readable manifest (files are verified when used)."""
        found = []
        for manifest in sorted(self.root.glob(f"*/{MANIFEST}")):
            try:
                data = json.loads(manifest.read_text())
                size = sum(f["size"] for f in data["files"].values())
                found.append(Entry(data["name"], manifest.parent, size, data["source"]))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                log.warning("%s is damaged; the next use of that model fetches it again", manifest)
        return found

    def _publish(self, tmp: Path, name: str) -> Path:
        """Rename a finished build into place (another process may have won the race)."""
        final = self.path(name)
        try:
            tmp.rename(final)
        except OSError:
            if self.get(name) is None:
                raise
        return final

    def _clean_partials(self) -> None:
        """Remove builds that were interrupted long ago; recent ones may still be running."""
        for partial in [*self.root.glob(".*.partial-*"), *self.root.glob(".download-*")]:
            try:
                if time.time() - partial.stat().st_mtime > STALE_PARTIAL_SECONDS:
                    shutil.rmtree(partial, ignore_errors=True)
            except FileNotFoundError:  # another process cleaned it first
                pass


def file_digest(path: Path) -> str:
    """sha256 of a file (~0.7 s for 538 MB here)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, name: str, source: str) -> None:
    """Record every file's size and hash; written last, so its presence means complete."""
    files = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": file_digest(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"name": name, "source": source, "created": int(time.time()), "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))


def verify(directory: Path) -> str | None:
    """None if every file in the manifest is there with its size and hash, else what is wrong."""
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return "no complete manifest"
    for rel, meta in files.items():
        path = directory / rel
        if not path.is_file() or path.stat().st_size != meta["size"]:
            return f"{rel} is missing or has the wrong size"
        if file_digest(path) != meta["sha256"]:
            return f"{rel} does not match its recorded hash"
    return None
