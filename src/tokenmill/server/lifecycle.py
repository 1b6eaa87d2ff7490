"""How the server stops: a drain on SIGTERM, an exit when the engine dies; and uvicorn run that way."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

import uvicorn

log = logging.getLogger(__name__)

FLUSH_TIMEOUT = 5.0  # seconds for the requests ended with an error to send it, after the drain


class Lifecycle:
    """Whether the server takes new work, how many HTTP requests are in flight, and the exit code.

    Draining: /health and new requests answer 503; in-flight ones get `shutdown_timeout` seconds to
    finish, then the engine ends the rest with an error; then the server stops (exit 0). An engine
    that dies stops the server at once (exit 1), so that a supervisor restarts it.
    """

    def __init__(self, shutdown_timeout: float):
        self.shutdown_timeout = shutdown_timeout
        self.draining = False
        self.exit_code = 0
        self.in_flight = 0  # HTTP requests being answered (counted by the request middleware)
        self.stop: Callable[[], None] = lambda: None  # set by whoever runs the server
        self._fail_all: Callable[[str], None] = lambda message: None

    def attach(self, fail_all: Callable[[str], None]) -> None:
        """How to end every request the engine still holds."""
        self._fail_all = fail_all

    async def drain(self) -> None:
        """Refuse new work, let in-flight requests finish (up to the timeout), end the rest, stop."""
        if self.draining:
            return
        self.draining = True
        log.info("shutting down: %d requests in flight get up to %g s to finish", self.in_flight, self.shutdown_timeout)
        if not await self._settle(self.shutdown_timeout):
            log.info("shutdown timeout: ending the %d requests still in flight with an error", self.in_flight)
            self._fail_all("The server is shutting down; this request was stopped before it finished.")
            await self._settle(FLUSH_TIMEOUT)
        self.stop()

    def engine_died(self) -> None:
        """The engine thread is gone: answer 503 from now on and stop, exit status 1."""
        self.draining = True
        self.exit_code = 1
        log.critical("the engine stopped: the server exits so that it can be restarted")
        asyncio.get_running_loop().call_later(0.5, self.stop)  # time for the failed requests' answers

    async def _settle(self, timeout: float) -> bool:
        """Wait until no HTTP request is in flight; False if the timeout came first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return not self.in_flight


class Server(uvicorn.Server):
    """uvicorn's server with tokenmill's signals: the first SIGTERM or SIGINT drains, a second SIGINT quits."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle):
        super().__init__(config)
        self.lifecycle = lifecycle
        lifecycle.stop = self._stop
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        """Signals arrive here (on the loop's thread); they are not re-raised after the drain."""
        if self.lifecycle.draining:
            if sig == signal.SIGINT:
                log.warning("second interrupt: exiting now")
                os._exit(130)
            return
        if self._loop is None or not self.started:
            self.should_exit = True  # not serving yet: nothing to drain
            return
        loop = self._loop  # narrowed here; the lambda runs later, on the loop
        loop.call_soon_threadsafe(lambda: loop.create_task(self.lifecycle.drain()))

    def _stop(self) -> None:
        self.should_exit = True


KEEP_ALIVE = 75  # seconds an idle HTTP/1.1 connection stays open (nginx's default)


def run(app, lifecycle: Lifecycle, host: str, port: int, log_level: str) -> int:
    """Serve `app` until drained or its engine dies; the process's exit status."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=None,
        access_log=False,
        # uvicorn closes an idle keep-alive connection after 5 s; a client that reuses it at that moment
        # (httpx, the openai SDK) gets a ReadError on a POST it will not retry: keep idle connections longer
        timeout_keep_alive=KEEP_ALIVE,
        timeout_graceful_shutdown=FLUSH_TIMEOUT,  # type: ignore[arg-type]  # uvicorn says int; it only hands it to asyncio.wait_for, which takes a float
    )
    Server(config, lifecycle).run()
    return lifecycle.exit_code
