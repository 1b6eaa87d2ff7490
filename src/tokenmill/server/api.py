"""The FastAPI app: routes, auth, and the bridge from HTTP to the engine."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from tokenmill import __version__
from tokenmill.config import ServerConfig
from tokenmill.outputs import ModelInfo, RequestOutput
from tokenmill.sampling_params import Prompt, SamplingParams
from tokenmill.server import errors
from tokenmill.server.errors import APIError, clip
from tokenmill.server.prompts import encode_prompts
from tokenmill.server.protocol import CompletionRequest, parse_request, to_sampling_params
from tokenmill.server.responses import Accumulator, Header, choice_of, fingerprint, usage_of
from tokenmill.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class EngineClient(Protocol):
    """What the HTTP layer needs of an engine (tokenmill.engine.AsyncEngine is one)."""

    info: ModelInfo
    tokenizer: Tokenizer

    def start(self) -> None: ...
    def shutdown(self) -> None: ...
    def generate(self, request_id: str, prompts: list[Prompt], params: SamplingParams) -> AsyncIterator[RequestOutput]: ...


def create_app(engine: EngineClient, config: ServerConfig) -> FastAPI:
    """The app, serving `engine` under `config`; the engine thread runs while the app does."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        log.info("serving %s on http://%s:%d", engine.info.name, config.host, config.port)
        yield
        engine.shutdown()

    app = FastAPI(title="tokenmill", version=__version__, lifespan=lifespan, redirect_slashes=False)
    errors.install(app)
    started = int(time.time())
    system_fingerprint = fingerprint(engine.info)  # fixed for the life of the app
    auth = [Depends(_bearer(config.api_key))]

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok"}

    @app.api_route("/v1/models", methods=["GET", "HEAD"], dependencies=auth)
    async def list_models():
        return {"object": "list", "data": [_model_card(engine.info, started)]}

    @app.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"], dependencies=auth)
    async def get_model(model_id: str):
        _check_model(engine.info, model_id)
        return _model_card(engine.info, started)

    @app.post("/v1/completions", dependencies=auth)
    async def create_completion(request: Request):
        body = parse_request(await request.body())
        _check_model(engine.info, body.model)
        # Tokenizing is CPU work in proportion to the prompt: off the event loop, so others go on.
        info = engine.info
        prompts = await run_in_threadpool(encode_prompts, body, engine.tokenizer, info.max_model_len, info.max_request_sequences)
        header = Header(engine.info.name, system_fingerprint)
        outputs = engine.generate(header.id, prompts, to_sampling_params(body))
        if body.stream:
            return EventSourceResponse(_stream(outputs, header, body.include_usage), sep="\n", ping=15)
        return await _complete(request, outputs, header, body, len(prompts))

    return app


def _bearer(api_key: str | None):
    """A dependency that checks `Authorization: Bearer KEY` in constant time."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.", type="authentication_error", code="invalid_api_key")

    return check


def _check_model(info: ModelInfo, name: str) -> None:
    if name != info.name:
        raise APIError(404, f"The model `{clip(name)}` does not exist. This server serves `{info.name}`.", param="model", code="model_not_found")


def _model_card(info: ModelInfo, created: int) -> dict:
    return {"id": info.name, "object": "model", "created": created, "owned_by": "tokenmill", "max_model_len": info.max_model_len}


async def _complete(request: Request, outputs: AsyncIterator[RequestOutput], header: Header, body: CompletionRequest, prompts: int) -> Response:
    """Gather a whole response; a client that leaves first stops its generation."""
    acc = Accumulator(prompts * body.n_, body.logprobs is not None)

    async def collect() -> None:
        async with aclosing(outputs):  # closing it early aborts the request in the engine
            async for output in outputs:
                if output.error:
                    raise errors.server_error(output.error)
                acc.add(output)

    work = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if work.cancelled():
        return Response(status_code=499)  # the client has gone; nobody reads this
    work.result()
    return JSONResponse(header.completion(acc.choices(), usage_of(acc.last)).model_dump())


async def _disconnected(request: Request) -> None:
    """Return once the client has gone away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(outputs: AsyncIterator[RequestOutput], header: Header, include_usage: bool):
    """Server-sent events: one chunk per choice delta, usage last if asked, then [DONE]."""
    try:
        async with aclosing(outputs):  # a client that leaves cancels this, which aborts the request
            async for output in outputs:
                if output.error:
                    yield _event(errors.server_error(output.error).body())
                    break
                for delta in output.choices:
                    chunk = header.completion([choice_of(delta)])
                    yield _event(chunk.model_dump(exclude=None if include_usage else {"usage"}))
                if output.finished and include_usage:
                    yield _event(header.completion([], usage_of(output)).model_dump())
    except Exception:  # after the 200 has gone out, an error can only be an event
        log.exception("stream %s failed", header.id)
        yield _event(errors.server_error().body())
    yield {"data": "[DONE]"}


def _event(payload: dict) -> dict:
    """One SSE data event holding a JSON object."""
    return {"data": json.dumps(payload, ensure_ascii=False, separators=(",", ":"))}
