"""Server processes for side-by-side runs: start, wait until healthy, sample memory, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


class ServerError(RuntimeError):
    """A server did not come up; the message ends with its log's last lines."""


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ServerSpec:
    """How to start one system: its command (with {port}), extra environment, and patience."""

    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    startup_s: float = 300.0


def log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a server's log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Server:
    """One system running in its own process group, its output in a log file."""

    def __init__(self, spec: ServerSpec, log_dir: Path):
        self.spec = spec
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / (spec.name.replace(" ", "_").replace("/", "_") + ".log")
        self.command = [part.replace("{port}", str(self.port)) for part in spec.command]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.command, env={**os.environ, **self.spec.env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_healthy(self) -> None:
        """Poll GET /health until it answers 200; fail early if the process exits."""
        import httpx

        proc = self.proc
        assert proc is not None  # __enter__ started it
        deadline = time.monotonic() + self.spec.startup_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerError(f"{self.spec.name} exited with status {proc.returncode}:\n{log_tail(self.log)}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise ServerError(f"{self.spec.name} did not answer /health within {self.spec.startup_s:.0f} s:\n{log_tail(self.log)}")

    def pause(self) -> None:
        """SIGSTOP to the process group: an idle server that polls (vLLM's worker does, ~2% of a core) takes no CPU."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT to the process group, after pause()."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 30 s (vLLM runs its engine in a child)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.resume()  # a stopped process acts on SIGTERM only once continued
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    kids: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after the command name, which may hold spaces
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _vmrss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB."""
    kids, todo, kib = _children(), [pid], 0
    while todo:
        p = todo.pop()
        kib += _vmrss_kib(p)
        todo += kids.get(p, [])
    return kib / 1024


class MemorySampler:
    """Samples a process tree's resident memory every `every` seconds in a thread: start, peak, end."""

    def __init__(self, pid: int, every: float = 0.5):
        self.pid, self.every = pid, every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self.samples.append(tree_rss_mib(self.pid))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(tree_rss_mib(self.pid))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(tree_rss_mib(self.pid))

    def result(self) -> dict[str, float]:
        return {"start": self.samples[0], "peak": max(self.samples), "end": self.samples[-1]}
