"""A Hugging Face Hub on 127.0.0.1 that serves local model directories, for the hub download path."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Answers the few routes huggingface_hub uses: model info, the file tree, and file downloads."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = repos
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo: str) -> list[Path]:
        return sorted(p for p in self.repos[repo].iterdir() if p.is_file())

    def answer(self, method: str, path: str) -> tuple[int, dict, bytes]:
        """Status, headers and body for one request."""
        self.requests.append(f"{method} {path}")
        parts = unquote(urlparse(path).path).strip("/").split("/")
        if parts[:2] == ["api", "models"] and "/".join(parts[2:4]) in self.repos:
            return self._api("/".join(parts[2:4]), parts[4:])
        if len(parts) >= 5 and parts[2] == "resolve" and "/".join(parts[:2]) in self.repos:
            return self._file("/".join(parts[:2]), "/".join(parts[4:]))
        return 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "Repository not found"}'

    def _api(self, repo: str, rest: list[str]) -> tuple[int, dict, bytes]:
        if rest[:1] == ["tree"]:
            tree = [{"type": "file", "oid": _oid(p), "size": p.stat().st_size, "path": p.name} for p in self.files(repo)]
            return 200, {"Content-Type": "application/json"}, json.dumps(tree).encode()
        info = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": [{"rfilename": p.name} for p in self.files(repo)]}
        return 200, {"Content-Type": "application/json"}, json.dumps(info).encode()

    def _file(self, repo: str, name: str) -> tuple[int, dict, bytes]:
        path = self.repos[repo] / name
        if not path.is_file():
            return 404, {"X-Error-Code": "EntryNotFound"}, b'{"error": "Entry not found"}'
        data = path.read_bytes()
        return 200, {"X-Repo-Commit": COMMIT, "ETag": f'"{_oid(path)}"', "Content-Type": "application/octet-stream"}, data

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._reply(body=True)

            def do_HEAD(self):
                self._reply(body=False)

            def _reply(self, body: bool):
                status, headers, data = hub.answer(self.command, self.path)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, *args):
                pass

        return Handler


def _oid(path: Path) -> str:
    """A git-style blob id of a file (what the hub calls its oid)."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
