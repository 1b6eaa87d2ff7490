"""The bridge between the event loop and the engine thread: generate(), abort(), and what it holds."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from tokenmill.engine.engine import Engine
from tokenmill.outputs import EngineStats, ModelInfo, RequestOutput, failure
from tokenmill.sampling_params import Prompt, SamplingParams
from tokenmill.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_UNREAD = 8  # outputs a request may have waiting unread before its generation pauses
RESUME_AT = MAX_UNREAD // 2  # ... and how few before it goes on
ENGINE_DIED = "The server's engine stopped; the server is restarting."


@dataclass
class Outbox:
    """One request's outputs on their way to its event loop, and how far its reader has got."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    posted: int = 0  # written by the engine thread only
    read: int = 0  # written by the event loop only
    paused: bool = False  # the engine paused the request: nobody read its outputs
    stall_timeout: float = 60.0  # seconds paused and unread before the request is aborted


class AsyncEngine:
    """Runs the engine in its own thread; each request reads its outputs from its own queue.

    The engine is built in that thread too: a model loaded in one thread and run in another ran
    25-40% slower here (SmolLM2, torch 2.13 CPU; loaded and run in one thread, either one, it did not).

    A reader that falls MAX_UNREAD outputs behind (a stream whose client stopped reading) pauses its
    request: its sequences leave the batch and give back their blocks, to be recomputed once it
    reads again. Paused and unread for its `stall_timeout` seconds, it is aborted.
    """

    def __init__(self, build: Callable[[], tuple[Engine, ModelInfo]]):
        """Start the engine thread and build the engine in it; a build error is raised here."""
        self._inbox: queue.Queue = queue.Queue()  # ("add", ...) / ("abort", id) / ("resume", id) / ("fail_all", ...) / ("stop",)
        self._outboxes: dict[str, Outbox] = {}
        self._death_watchers: list[tuple[asyncio.AbstractEventLoop, Callable[[], None]]] = []
        self.stats = EngineStats()  # replaced (never mutated) by the engine thread after each step
        self.dead: BaseException | None = None  # why the engine thread stopped, if it died
        self._closing: tuple[str, int] | None = None  # fail_all's message and status: new requests get them too
        self._submitted = 0  # adds put in the inbox (event loop)
        self._taken = 0  # adds taken from it (engine thread)
        built: Future = Future()
        self._thread: threading.Thread | None = threading.Thread(target=self._main, args=(build, built), name="tokenmill-engine", daemon=True)
        self._thread.start()
        built.result()  # the engine thread has set self.engine and self.info

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def alive(self) -> bool:
        return self.dead is None and self._thread is not None

    def queued(self) -> int:
        """Requests waiting for the engine: not yet taken in, or held with nothing running."""
        return self._submitted - self._taken + self.stats.waiting_requests

    def start(self) -> None:
        """Serve requests: the engine thread has been waiting for them since the engine was built."""

    def on_death(self, callback: Callable[[], None]) -> None:
        """Call `callback` on the calling event loop if the engine thread dies."""
        self._death_watchers.append((asyncio.get_running_loop(), callback))

    def shutdown(self) -> None:
        """Stop the engine thread after the step in flight."""
        if self._thread is not None:
            self._inbox.put(("stop",))
            self._thread.join(timeout=30)
            self._thread = None

    def fail_all(self, message: str, status: int = 503) -> None:
        """End every request the engine holds, and any submitted later, with an error (shutting down)."""
        self._closing = (message, status)
        self._inbox.put(("fail_all", message, status))

    def generate(
        self, request_id: str, prompts: list[Prompt], params: SamplingParams, timeout: float | None = None, stall_timeout: float = 60.0
    ) -> AsyncGenerator[RequestOutput, None]:
        """Submit a request now; iterate the result for its outputs. Leaving early aborts it.

        After `timeout` seconds, or paused unread for `stall_timeout`, the request is aborted and
        its last output is a 408 error. Whoever submits calls release() when done with it, in case
        the outputs are never iterated.
        """
        if not self.alive:
            return _single(failure(request_id, "The engine is not running; the server is shutting down.", 503))
        if self._closing is not None:
            return _single(failure(request_id, *self._closing))
        box = Outbox(asyncio.get_running_loop(), stall_timeout=stall_timeout)
        self._outboxes[request_id] = box
        self._submitted += 1
        self._inbox.put(("add", request_id, prompts, params))
        if self.dead is not None:  # it died after the check above, before this request was there to fail
            box.queue.put_nowait(failure(request_id, ENGINE_DIED, 503))
        return self._outputs(request_id, box, timeout)

    def release(self, request_id: str) -> None:
        """Forget a request's outbox and abort it, unless it has already finished (idempotent)."""
        if self._outboxes.pop(request_id, None) is not None:
            self.abort(request_id)

    async def _outputs(self, request_id: str, box: Outbox, timeout: float | None) -> AsyncGenerator[RequestOutput, None]:
        """A submitted request's outputs, until it finishes, fails, times out or is closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        finished = timed_out = False
        try:
            while not finished:
                output = await self._next(box, deadline)
                if output is None:
                    timed_out = True
                    output = failure(request_id, f"The request ran longer than the server's limit of {timeout:g} s.", 408)
                finished = output.finished
                yield output
        finally:
            self._outboxes.pop(request_id, None)
            if not finished or timed_out:
                self.abort(request_id)

    async def _next(self, box: Outbox, deadline: float | None) -> RequestOutput | None:
        """The next output of a request (None once its deadline has passed)."""
        if deadline is None:
            output = await box.queue.get()
        else:
            try:
                output = await asyncio.wait_for(box.queue.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return None
        box.read += 1
        self._resume_if_read(box, output.request_id)
        return output

    def _resume_if_read(self, box: Outbox, request_id: str) -> None:
        """A paused request whose reader has caught up goes on (event loop side)."""
        if box.paused and box.posted - box.read <= RESUME_AT:
            box.paused = False
            self._inbox.put(("resume", request_id))

    def abort(self, request_id: str) -> None:
        """Stop a request's generation (the client went away)."""
        self._inbox.put(("abort", request_id))

    def _main(self, build: Callable[[], tuple[Engine, ModelInfo]], built: Future) -> None:
        """The engine thread: build the engine, then run it; if it dies, say so to everyone."""
        try:
            self.engine, self.info = build()
        except BaseException as exc:  # handed to the constructor, which raises it
            built.set_exception(exc)
            return
        built.set_result(None)
        try:
            self._run()
        except BaseException as exc:
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        """The engine loop failed outside any step: fail every request and call the watchers."""
        log.critical("the engine thread died: %r", exc, exc_info=exc)
        self.dead = exc
        for request_id in list(self._outboxes):
            self._post(failure(request_id, ENGINE_DIED, 503))
        for loop, callback in self._death_watchers:
            try:
                loop.call_soon_threadsafe(callback)
            except RuntimeError:  # that loop has closed
                pass

    def _run(self) -> None:
        """Take commands, step while there is work, post outputs."""
        while True:
            if not self._take_commands(block=not self.engine.has_work()):
                return
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a failed step fails the requests in it, never the thread
                log.exception("engine step failed")
                outputs = [self.engine.fail(request_id, exc) for request_id in self.engine.request_ids()]
            for output in outputs:
                self._post(output)
            self.stats = self.engine.stats()

    def _take_commands(self, block: bool) -> bool:
        """Apply queued commands; False once asked to stop."""
        while True:
            try:
                command = self._inbox.get(block=block)
            except queue.Empty:
                self.stats = self.engine.stats()  # once for all the commands just applied
                return True
            block = False
            kind = command[0]
            if kind == "stop":
                return False
            if kind == "add":
                self._taken += 1
                self._add(*command[1:])
            elif kind == "abort":
                self.engine.abort(command[1])
            elif kind == "resume":
                self.engine.resume(command[1])
            elif kind == "fail_all":
                for request_id in self.engine.request_ids():
                    self.engine.abort(request_id)
                    self._post(failure(request_id, command[1], command[2]))

    def _add(self, request_id: str, prompts: list[Prompt], params: SamplingParams) -> None:
        """Add a request, unless its client already left; one the engine refuses fails alone."""
        if request_id not in self._outboxes:
            return
        try:
            self.engine.add_request(request_id, prompts, params)
        except ValueError as exc:
            log.warning("request %s refused: %s", request_id, exc)
            self._post(failure(request_id, f"The server cannot serve this request: {exc}."))

    def _post(self, output: RequestOutput) -> None:
        """Hand an output to its request's event loop; pause a request whose reader fell behind."""
        box = self._outboxes.get(output.request_id)
        if box is None:
            return
        box.posted += 1
        try:
            box.loop.call_soon_threadsafe(box.queue.put_nowait, output)
            if not output.finished and not box.paused and box.posted - box.read >= MAX_UNREAD:
                self.engine.pause(output.request_id)
                box.paused = True
                box.loop.call_soon_threadsafe(self._watch_paused, box, output.request_id)
        except RuntimeError:  # that request's event loop has closed: nobody is listening
            self._outboxes.pop(output.request_id, None)

    def _watch_paused(self, box: Outbox, request_id: str) -> None:
        """Event loop side of a pause: resume if the reader already caught up, else time the stall."""
        self._resume_if_read(box, request_id)
        if box.paused:
            box.loop.call_later(box.stall_timeout, self._check_stall, box, request_id, box.read)

    def _check_stall(self, box: Outbox, request_id: str, read_before: int) -> None:
        """Abort a request still paused and unread after stall_timeout; its reader finds an error last."""
        if not box.paused or self._outboxes.get(request_id) is not box:
            return
        if box.read != read_before:  # it read a little, not enough to resume: time it again
            box.loop.call_later(box.stall_timeout, self._check_stall, box, request_id, box.read)
            return
        log.info("request %s: stream unread for %g s, aborted", request_id, box.stall_timeout)
        self.abort(request_id)
        while not box.queue.empty():  # what it did not read is dropped; memory goes back now
            box.queue.get_nowait()
        box.paused = False
        box.queue.put_nowait(failure(request_id, f"The stream was not read for {box.stall_timeout:g} s; its generation was stopped.", 408))


async def _single(output: RequestOutput) -> AsyncGenerator[RequestOutput, None]:
    yield output
