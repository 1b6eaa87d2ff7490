"""How `tokenmill serve` stops: a drain on SIGTERM, a quick exit on a second SIGINT, an exit when the engine dies."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_healthy

LONG = 8000  # tokens: far more than a 2 s shutdown timeout lets through
CRASHING_SERVER = """
import os, sys
from tokenmill.cli import main
from tokenmill.engine.async_engine import AsyncEngine

class Crash(BaseException):
    pass

trigger, take = sys.argv[1], AsyncEngine._take_commands

def crashing(self, block):
    if self.engine.request_ids() and os.path.exists(trigger):
        raise Crash("the engine loop dies on purpose")
    return take(self, block)

AsyncEngine._take_commands = crashing
raise SystemExit(main(sys.argv[2:]))
"""


@dataclass
class Proc:
    """A `tokenmill serve` process, its URL, its model's name and its log file."""

    proc: subprocess.Popen
    url: str
    model: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def exit_status(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not exit within {timeout} s; its log:\n{self.output()[-4000:]}")


@contextlib.contextmanager
def served(model_dir: Path, tmp_path: Path, shutdown_timeout: float, prefix: list[str] | None = None):
    """Start the server in a subprocess, wait for /health to be 200; kill it after, whatever happened."""
    port = free_port()
    serve = ["serve", "--model", str(model_dir), "--port", str(port), "--shutdown-timeout", str(shutdown_timeout)]
    cmd = prefix or [sys.executable, "-m", "tokenmill"]
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*cmd, *serve], stdout=out, stderr=subprocess.STDOUT)
    server = Proc(proc, f"http://127.0.0.1:{port}", str(model_dir), log)
    try:
        try:
            wait_healthy(server.url, 60, proc)
        except AssertionError as exc:
            pytest.fail(f"{exc}:\n{server.output()[-4000:]}")
        assert httpx.get(server.url + "/v1/models", timeout=5).json()["data"][0]["id"] == server.model
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def complete(server: Proc, max_tokens: int) -> httpx.Response:
    body = {"model": server.model, "prompt": "a", "max_tokens": max_tokens, "ignore_eos": True}
    return httpx.post(server.url + "/v1/completions", json=body, timeout=120)


def stream(server: Proc, max_tokens: int, started: threading.Event, lines: list[str]) -> list[str]:
    """Append a stream's `data:` payloads to `lines` as they come; set `started` at the first."""
    body = {"model": server.model, "prompt": "a", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                lines.append(line[len("data: ") :])
                started.set()
    return lines


def running(server: Proc) -> int:
    """Requests in the engine's running batch, from /metrics."""
    for line in httpx.get(server.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("tokenmill_requests_running "):
            return int(float(line.split()[1]))
    raise AssertionError("no tokenmill_requests_running in /metrics")


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def health_status(server: Proc) -> int:
    return httpx.get(server.url + "/health", timeout=5).status_code


def assert_unavailable(response: httpx.Response) -> None:
    """A 503 with OpenAI's error object, code service_unavailable."""
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "service_unavailable"
    assert error["message"]


def assert_ends_with_error(lines: list[str]) -> None:
    """A stream whose last events are an error object, then [DONE]."""
    assert len(lines) >= 2 and lines[-1] == "[DONE]", lines[-3:]
    error = json.loads(lines[-2])["error"]
    assert error["type"] == "server_error" and error["code"] == "service_unavailable" and error["message"]
    assert "[DONE]" not in lines[:-1]


def completion_chunks(lines: list[str]) -> list[dict]:
    """A stream's completion chunks: not its error event, not [DONE]."""
    events = [json.loads(line) for line in lines if line != "[DONE]"]
    return [event for event in events if "error" not in event]


@pytest.mark.slow
def test_sigterm_drains_then_ends_what_is_left(long_llama_dir, tmp_path):
    """In-flight requests get the shutdown timeout, then an error; new ones get 503; exit 0."""
    with ThreadPoolExecutor(3) as pool, served(long_llama_dir, tmp_path, shutdown_timeout=2) as server:
        started, lines = threading.Event(), []
        long_stream = pool.submit(stream, server, LONG, started, lines)
        assert started.wait(30), "the long stream sent nothing"
        long_whole = pool.submit(complete, server, LONG)
        wait_until(lambda: running(server) >= 2, 30, "both long requests to run")
        short = pool.submit(complete, server, 5)
        wait_until(lambda: short.done() or running(server) >= 3, 30, "the short request to run")
        server.proc.send_signal(signal.SIGTERM)

        wait_until(lambda: health_status(server) == 503, 1, "/health to answer 503")
        refused = complete(server, 5)
        assert_unavailable(refused)
        assert refused.headers["retry-after"]

        answer = short.result(timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["finish_reason"] == "length"
        assert answer.json()["usage"]["completion_tokens"] == 5
        lines = long_stream.result(timeout=30)
        assert_ends_with_error(lines)
        assert completion_chunks(lines), "the long stream sent no tokens before its error"
        assert_unavailable(long_whole.result(timeout=30))
        assert server.exit_status(timeout=2 + 10) == 0
        assert "Traceback" not in server.output()


@pytest.mark.slow
def test_sigterm_lets_requests_finish_within_the_timeout(long_llama_dir, tmp_path):
    """Requests in flight at SIGTERM that finish within the shutdown timeout end normally; exit 0."""
    with ThreadPoolExecutor(2) as pool, served(long_llama_dir, tmp_path, shutdown_timeout=60) as server:
        started, lines = threading.Event(), []
        flowing = pool.submit(stream, server, 300, started, lines)
        assert started.wait(30), "the stream sent nothing"
        whole = pool.submit(lambda: (complete(server, 300), time.monotonic()))
        wait_until(lambda: running(server) >= 2, 30, "both requests to run")
        server.proc.send_signal(signal.SIGTERM)
        signalled, at_signal = time.monotonic(), len(lines)
        wait_until(lambda: health_status(server) == 503, 1, "/health to answer 503")

        lines = flowing.result(timeout=90)
        assert lines[-1] == "[DONE]" and "[DONE]" not in lines[:-1]
        chunks = completion_chunks(lines)
        assert len(chunks) == len(lines) - 1, f"the stream had an error event: {lines[-2]}"
        assert at_signal < len(chunks), "the stream had already finished at SIGTERM"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        answer, answered = whole.result(timeout=90)
        assert answered > signalled, "the non-streamed request had already finished at SIGTERM"
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["finish_reason"] == "length"
        assert answer.json()["usage"]["completion_tokens"] == 300
        assert server.exit_status(timeout=30) == 0
        assert "Traceback" not in server.output()


@pytest.mark.slow
def test_a_second_sigint_exits_at_once(long_llama_dir, tmp_path):
    """SIGINT starts the drain; a second SIGINT during it exits with status 130."""
    with ThreadPoolExecutor(1) as pool, served(long_llama_dir, tmp_path, shutdown_timeout=60) as server:
        started = threading.Event()
        pool.submit(stream, server, LONG, started, [])
        assert started.wait(30), "the stream sent nothing"
        server.proc.send_signal(signal.SIGINT)
        wait_until(lambda: health_status(server) == 503, 1, "/health to answer 503 after the first SIGINT")
        time.sleep(0.5)
        assert server.proc.poll() is None, "the first SIGINT did not wait for the request in flight"
        server.proc.send_signal(signal.SIGINT)
        assert server.exit_status(timeout=5) == 130


@pytest.mark.slow
def test_a_first_sigint_drains_and_exits_0(long_llama_dir, tmp_path):
    """An idle server stops on one SIGINT with status 0 (the signal is not re-raised after the drain)."""
    with served(long_llama_dir, tmp_path, shutdown_timeout=60) as server:
        server.proc.send_signal(signal.SIGINT)
        assert server.exit_status(timeout=10) == 0
    assert "Traceback" not in server.output()


@pytest.mark.slow
def test_the_server_exits_1_when_its_engine_dies(long_llama_dir, tmp_path):
    """An exception out of the engine loop fails every waiting request, /health says 503, and the process exits 1."""
    script = tmp_path / "crashing_server.py"
    script.write_text(CRASHING_SERVER)
    trigger = tmp_path / "crash-now"
    crashing = [sys.executable, str(script), str(trigger)]
    with ThreadPoolExecutor(2) as pool, served(long_llama_dir, tmp_path, shutdown_timeout=30, prefix=crashing) as server:
        first = complete(server, 5)
        assert first.status_code == 200, first.text
        started, lines = threading.Event(), []
        long_stream = pool.submit(stream, server, LONG, started, lines)
        assert started.wait(30), "the long stream sent nothing"
        long_whole = pool.submit(complete, server, LONG)
        wait_until(lambda: running(server) >= 2, 30, "both long requests to run")
        trigger.touch()

        lines = long_stream.result(timeout=30)
        assert_ends_with_error(lines)
        assert_unavailable(long_whole.result(timeout=30))
        with contextlib.suppress(httpx.TransportError):  # it may be gone already
            assert health_status(server) == 503
        assert server.exit_status(timeout=10) == 1
    log = server.output()
    assert "the engine thread died" in log and "Crash" in log
