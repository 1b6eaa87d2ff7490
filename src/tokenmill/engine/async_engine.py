"""The bridge between the event loop and the engine thread: generate() and abort()."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

from tokenmill.engine.engine import Engine
from tokenmill.outputs import ModelInfo, RequestOutput
from tokenmill.sampling_params import Prompt, SamplingParams
from tokenmill.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class AsyncEngine:
    """Runs the engine in its own thread; each request reads its outputs from its own queue.

    The engine is built in that thread too: a model loaded in one thread and run in another ran
    25-40% slower here (SmolLM2, torch 2.13 CPU; loaded and run in one thread, either one, it did not).
    """

    def __init__(self, build: Callable[[], tuple[Engine, ModelInfo]]):
        """Start the engine thread and build the engine in it; a build error is raised here."""
        self._inbox: queue.Queue = queue.Queue()  # ("add", ...) / ("abort", id) / ("stop",)
        self._outboxes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        built: Future = Future()
        self._thread: threading.Thread | None = threading.Thread(target=self._main, args=(build, built), name="tokenmill-engine", daemon=True)
        self._thread.start()
        built.result()  # the engine thread has set self.engine and self.info

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def start(self) -> None:
        """Serve requests: the engine thread has been waiting for them since the engine was built."""

    def shutdown(self) -> None:
        """Stop the engine thread after the step in flight."""
        if self._thread is not None:
            self._inbox.put(("stop",))
            self._thread.join(timeout=30)
            self._thread = None

    async def generate(self, request_id: str, prompts: list[Prompt], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine makes them; leaving early aborts it."""
        outbox: asyncio.Queue = asyncio.Queue()
        self._outboxes[request_id] = (asyncio.get_running_loop(), outbox)
        self._inbox.put(("add", request_id, prompts, params))
        finished = False
        try:
            while not finished:
                output: RequestOutput = await outbox.get()
                finished = output.finished
                yield output
        finally:
            self._outboxes.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request's generation (the client went away)."""
        self._inbox.put(("abort", request_id))

    def _main(self, build: Callable[[], tuple[Engine, ModelInfo]], built: Future) -> None:
        """The engine thread: build the engine, then run it."""
        try:
            self.engine, self.info = build()
        except BaseException as exc:  # handed to the constructor, which raises it
            built.set_exception(exc)
            return
        built.set_result(None)
        self._run()

    def _run(self) -> None:
        """Take commands, step while there is work, post outputs."""
        while True:
            try:
                if not self._take_commands(block=not self.engine.has_unfinished()):
                    return
                outputs = self.engine.step()
            except Exception as exc:  # a failed step fails the requests in it, never the thread
                log.exception("engine step failed")
                outputs = [self.engine.fail(request_id, exc) for request_id in self.engine.request_ids()]
            for output in outputs:
                self._post(output)

    def _take_commands(self, block: bool) -> bool:
        """Apply queued adds and aborts; False once asked to stop."""
        while True:
            try:
                command = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if command[0] == "stop":
                return False
            if command[0] == "add":
                self._add(*command[1:])
            else:
                self.engine.abort(command[1])

    def _add(self, request_id: str, prompts: list[Prompt], params: SamplingParams) -> None:
        """Add a request, unless its client already left; one the engine refuses fails alone."""
        if request_id not in self._outboxes:
            return
        try:
            self.engine.add_request(request_id, prompts, params)
        except ValueError as exc:
            log.warning("request %s refused: %s", request_id, exc)
            self._post(RequestOutput(request_id, [], 0, 0, finished=True, error=f"The server cannot serve this request: {exc}."))

    def _post(self, output: RequestOutput) -> None:
        """Hand an output to its request's event loop."""
        target = self._outboxes.get(output.request_id)
        if target is not None:
            loop, outbox = target
            try:
                loop.call_soon_threadsafe(outbox.put_nowait, output)
            except RuntimeError:  # that request's event loop has closed: nobody is listening
                self._outboxes.pop(output.request_id, None)
