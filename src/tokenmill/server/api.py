"""The FastAPI app: routes, auth, and the bridge from HTTP to the engine."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing, asynccontextmanager, contextmanager
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from tokenmill import __version__
from tokenmill.config import ServerConfig
from tokenmill.outputs import EngineStats, ModelInfo, RequestOutput
from tokenmill.sampling_params import GrammarSpec, Prompt, SamplingParams
from tokenmill.server import errors
from tokenmill.server.chat_protocol import ChatCompletion, ChatCompletionRequest, parse_chat_request, to_chat_sampling_params
from tokenmill.server.chat_responses import ChatRender
from tokenmill.server.errors import APIError, ErrorResponse, clip
from tokenmill.server.lifecycle import Lifecycle
from tokenmill.server.metrics import Metrics, RequestTimer
from tokenmill.server.middleware import RequestMiddleware
from tokenmill.server.prompts import encode_chat, encode_prompts
from tokenmill.server.protocol import Completion, CompletionRequest, parse_request, to_sampling_params
from tokenmill.server.responses import Accumulator, Header, completion_chunks, fingerprint, new_id
from tokenmill.server.structured import compile_grammar, grammar_of
from tokenmill.server.tokenization import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeResponse,
    TokenizeText,
    detokenize,
    parse_detokenize,
    parse_tokenize,
    tokenize,
    tokenizer_card,
)
from tokenmill.server.tool_calls import check_auto_tools
from tokenmill.tokenizer import Tokenizer

log = logging.getLogger(__name__)


PARSE_INLINE_BYTES = 64 * 1024  # bodies larger than this are parsed in a worker thread, not on the event loop
RETRY_AFTER = "1"  # seconds, on 429 and 503
ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 429, 500, 503)}


class EngineClient(Protocol):
    """What the HTTP layer needs of an engine (tokenmill.engine.AsyncEngine is one)."""

    info: ModelInfo
    stats: EngineStats

    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def alive(self) -> bool: ...

    def start(self) -> None: ...
    def shutdown(self) -> None: ...
    def queued(self) -> int: ...
    def on_death(self, callback: Callable[[], None]) -> None: ...
    def fail_all(self, message: str, status: int = 503) -> None: ...
    def generate(
        self, request_id: str, prompts: list[Prompt], params: SamplingParams, timeout: float | None = None, stall_timeout: float = 60.0
    ) -> AsyncGenerator[RequestOutput, None]: ...
    def release(self, request_id: str) -> None: ...


def create_app(engine: EngineClient, config: ServerConfig) -> FastAPI:
    """The app, serving `engine` under `config`; the engine thread runs while the app does.

    app.state.lifecycle says whether it is draining, and the exit status once it has stopped.
    """
    lifecycle = Lifecycle(config.shutdown_timeout)
    admission = Admission(engine, lifecycle, config.max_queued_requests)
    metrics = Metrics(lambda: engine.stats, lambda: admission.preparing + engine.queued())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        engine.on_death(lifecycle.engine_died)
        lifecycle.attach(engine.fail_all)
        log.info("serving %s on http://%s:%d", engine.info.name, config.host, config.port)
        yield
        engine.shutdown()

    app = FastAPI(title="tokenmill", version=__version__, lifespan=lifespan, redirect_slashes=False, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lifecycle = lifecycle
    errors.install(app)
    if config.origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=config.origins, allow_methods=["*"], allow_headers=["*"], expose_headers=["X-Request-Id", "Retry-After"]
        )
    app.add_middleware(RequestMiddleware, lifecycle=lifecycle, metrics=metrics)
    started = int(time.time())
    system_fingerprint = fingerprint(engine.info)  # fixed for the life of the app
    auth = [Depends(_bearer(config.api_key))]
    _add_docs(app, auth)

    @app.head("/health", include_in_schema=False)
    @app.get("/health")
    async def health():
        if not engine.alive or lifecycle.draining:
            return JSONResponse({"status": "unavailable"}, status_code=503, headers={"Retry-After": RETRY_AFTER})
        return {"status": "ok"}

    @app.get("/metrics", dependencies=auth if config.protect_metrics else [], include_in_schema=False)
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.head("/v1/models", dependencies=auth, include_in_schema=False)
    @app.get("/v1/models", dependencies=auth)
    async def list_models():
        return {"object": "list", "data": [_model_card(engine.info, started)]}

    @app.head("/v1/models/{model_id:path}", dependencies=auth, include_in_schema=False)
    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def get_model(model_id: str):
        _check_model(engine.info, model_id)
        return _model_card(engine.info, started)

    def start(request: Request, header: Header, arrived: float, prompts: list[Prompt], params: SamplingParams) -> AsyncGenerator[RequestOutput, None]:
        """Hand a prepared request to the engine; however its response ends, the engine lets it go."""
        request.state.request_id = header.id
        request.state.on_close = lambda: engine.release(header.id)
        timer = RequestTimer(metrics, request.state, arrived, params.n * len(prompts))
        return timer.watch(engine.generate(header.id, prompts, params, config.request_timeout, config.stream_stall_timeout))

    @app.post(
        "/v1/completions",
        dependencies=auth,
        openapi_extra=_request_body(CompletionRequest),
        responses={200: {"model": Completion, "description": "A text_completion object, or server-sent events of them"}, **ERRORS},
    )
    async def create_completion(request: Request):
        arrived = time.monotonic()
        with admission.admit():
            body, prompts, grammar = await _prepare(request, engine, config)
            header = Header(engine.info.name, system_fingerprint)
            outputs = start(request, header, arrived, prompts, to_sampling_params(body, grammar))
        if body.stream:
            return _sse(request, _events(outputs, header.id, [], completion_chunks(header, body.include_usage)), config.sse_keepalive)
        acc = await _collect(request, outputs, Accumulator(len(prompts) * body.n_, body.logprobs is not None))
        if acc is None:
            return Response(status_code=499)  # the client has gone; nobody reads this
        return JSONResponse(header.completion(acc.choices(), acc.usage()).model_dump())

    @app.post(
        "/v1/chat/completions",
        dependencies=auth,
        openapi_extra=_request_body(ChatCompletionRequest),
        responses={200: {"model": ChatCompletion, "description": "A chat.completion object, or server-sent events of chat.completion.chunk objects"}, **ERRORS},
    )
    async def create_chat_completion(request: Request):
        arrived = time.monotonic()
        with admission.admit():
            body, prompt, max_tokens, grammar = await _prepare_chat(request, engine, config)
            header = Header(engine.info.name, system_fingerprint, new_id("chatcmpl-"))
            outputs = start(request, header, arrived, [prompt], to_chat_sampling_params(body, max_tokens, grammar))
        render = ChatRender(header, engine.tokenizer, body.n_, body.echo_text(), body.include_usage, [f.name for f in body.forced_tools], body.auto_tools)
        if body.stream:
            return _sse(request, _events(outputs, header.id, render.opening(), render.chunks), config.sse_keepalive)
        acc = await _collect(request, outputs, Accumulator(body.n_, bool(body.logprobs)))
        if acc is None:
            return Response(status_code=499)
        return JSONResponse(render.whole(acc))

    @app.post("/tokenize", dependencies=auth, openapi_extra=_request_body(TokenizeText), response_model=TokenizeResponse, responses={**ERRORS})
    async def tokenize_route(request: Request):
        body = await _parse(request, parse_tokenize, config)
        _check_model(engine.info, body.model or engine.info.name)
        return await run_in_threadpool(tokenize, body, engine.tokenizer, engine.info.max_model_len)

    @app.get("/tokenizer_info", dependencies=auth)
    async def tokenizer_info():
        return tokenizer_card(engine.tokenizer, engine.info.max_model_len)

    @app.post("/detokenize", dependencies=auth, openapi_extra=_request_body(DetokenizeRequest), response_model=DetokenizeResponse, responses={**ERRORS})
    async def detokenize_route(request: Request):
        body = await _parse(request, parse_detokenize, config)
        _check_model(engine.info, body.model or engine.info.name)
        return await run_in_threadpool(detokenize, body, engine.tokenizer)

    return app


class Admission:
    """Who gets in: 503 while shutting down or without an engine, 429 when the waiting queue is full.

    A request counts as waiting from admission, through parsing and tokenizing, until the engine runs it.
    """

    def __init__(self, engine: EngineClient, lifecycle: Lifecycle, max_queued: int):
        self.engine, self.lifecycle, self.max_queued = engine, lifecycle, max_queued
        self.preparing = 0  # admitted, not yet handed to the engine

    @contextmanager
    def admit(self):
        """Hold a place in the queue while the request is prepared; raise 503 or 429 if there is none."""
        if self.lifecycle.draining or not self.engine.alive:
            raise APIError(
                503,
                "The server is shutting down and takes no new requests; retry on another instance.",
                type="server_error",
                code="service_unavailable",
                headers={"Retry-After": RETRY_AFTER},
            )
        if self.preparing + self.engine.queued() >= self.max_queued:
            raise APIError(
                429,
                f"Too many requests are waiting ({self.max_queued} queued at most); retry after a second.",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": RETRY_AFTER},
            )
        self.preparing += 1
        try:
            yield
        finally:
            self.preparing -= 1


async def _prepare(request: Request, engine: EngineClient, config: ServerConfig) -> tuple[CompletionRequest, list[Prompt], GrammarSpec | None]:
    """Read, parse and tokenize a completion request, and compile its grammar; big bodies, prompts and grammars off the event loop."""
    body = await _parse(request, parse_request, config)
    info = engine.info
    _check_model(info, body.model)
    grammar = await _grammar(body, engine)
    prompts = await run_in_threadpool(encode_prompts, body, engine.tokenizer, info.max_model_len, info.max_request_sequences)
    return body, prompts, grammar


async def _prepare_chat(request: Request, engine: EngineClient, config: ServerConfig) -> tuple[ChatCompletionRequest, Prompt, int, GrammarSpec | None]:
    """Read and parse a chat request, compile its grammar, and render its messages through the chat template (off the event loop)."""
    body = await _parse(request, parse_chat_request, config)
    info = engine.info
    _check_model(info, body.model)
    if body.auto_tools:
        check_auto_tools(config.tool_call_parser, engine.tokenizer)
    grammar = await _grammar(body, engine)
    prompt, max_tokens = await run_in_threadpool(encode_chat, body, engine.tokenizer, info.max_model_len, info.max_request_sequences)
    return body, prompt, max_tokens, grammar


async def _grammar(body, engine: EngineClient) -> GrammarSpec | None:
    """The request's output constraint, compiled (and cached) before it is queued: a bad one is a 400."""
    constraint = grammar_of(body)
    if constraint is None:
        return None
    return await run_in_threadpool(compile_grammar, engine.tokenizer.grammars, constraint)


async def _parse(request: Request, parse, config: ServerConfig):
    """A request body read and parsed by `parse`."""
    raw = await _read_body(request, config.request_bytes)
    return parse(raw) if len(raw) <= PARSE_INLINE_BYTES else await run_in_threadpool(parse, raw)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to pass `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit} bytes.", code="request_too_large")


def _request_body(model) -> dict:
    """OpenAPI's requestBody for a route that parses its own body (off the event loop)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _add_docs(app: FastAPI, auth: list) -> None:
    """/openapi.json, /docs and /redoc, behind the API key when one is set."""

    def schema() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in (CompletionRequest, ChatCompletionRequest, TokenizeText, DetokenizeRequest):
                request_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(request_schema.pop("$defs", {}))
                components[model.__name__] = request_schema
            app.openapi_schema = spec
        return app.openapi_schema

    @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
    async def openapi_json():
        return JSONResponse(schema())

    @app.get("/docs", dependencies=auth, include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="tokenmill")

    @app.get("/redoc", dependencies=auth, include_in_schema=False)
    async def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title="tokenmill")


def _bearer(api_keys: tuple[str, ...]):
    """A dependency that checks `Authorization: Bearer KEY` against every key, each in constant time."""
    keys = [k.encode() for k in api_keys]

    async def check(request: Request) -> None:
        if not keys:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        sent = given.strip().encode("utf-8", "replace")
        matches = [hmac.compare_digest(sent, key) for key in keys]  # every key compared: no early exit
        if scheme.lower() != "bearer" or not sent:
            raise APIError(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                type="authentication_error",
                code="invalid_api_key",
            )
        if not any(matches):
            raise APIError(
                401, "Incorrect API key provided. Check the key this server was started with (--api-key).", type="authentication_error", code="invalid_api_key"
            )

    return check


def _check_model(info: ModelInfo, name: str) -> None:
    if name != info.name:
        raise APIError(404, f"The model `{clip(name)}` does not exist. This server serves `{info.name}`.", param="model", code="model_not_found")


def _model_card(info: ModelInfo, created: int) -> dict:
    return {"id": info.name, "object": "model", "created": created, "owned_by": "tokenmill", "max_model_len": info.max_model_len}


async def _collect(request: Request, outputs: AsyncGenerator[RequestOutput, None], acc: Accumulator) -> Accumulator | None:
    """Gather a whole response (None if the client left first, which stops its generation)."""

    async def collect() -> None:
        async with aclosing(outputs):  # closing it early aborts the request in the engine
            async for output in outputs:
                if output.error:
                    raise errors.engine_error(output.error, output.error_status)
                acc.add(output)

    work = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)  # its aclosing has aborted the request
    if work.cancelled():
        request.state.gone = True
        return None
    work.result()
    return acc


def _sse(request: Request, events, keepalive: float | None) -> EventSourceResponse:
    """A server-sent event stream of `events`; comment pings only when asked (some clients choke on them)."""
    return _EventStream(events, sep="\n", ping=keepalive or 0, client_close_handler_callable=lambda message: _note_gone(request))


class _EventStream(EventSourceResponse):
    """sse-starlette's stream, with nothing sent after `data: [DONE]` but the end of the body.

    Its ping task and the stream's close take turns at one lock, so a ping due in between could
    follow [DONE] (it did once in a test at a 10 ms keepalive, 2026-12-03); a client reading to
    the end would then see a comment after the last event.
    """

    async def __call__(self, scope, receive, send) -> None:
        done = False

        async def send_until_done(message) -> None:
            nonlocal done
            if done and message["type"] == "http.response.body" and message.get("more_body"):
                return  # a ping that lost the race to the stream's end
            done = done or message.get("body", b"").startswith(b"data: [DONE]")
            await send(message)

        await super().__call__(scope, receive, send_until_done)


async def _note_gone(request: Request) -> None:
    """The client of a stream left before its end (its log line says so)."""
    request.state.gone = True


async def _disconnected(request: Request) -> None:
    """Return once the client has gone away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(outputs: AsyncGenerator[RequestOutput, None], request_id: str, opening: list[dict], chunks: Callable[[RequestOutput], list[dict]]):
    """Server-sent events: the opening chunks, the chunks of each output, then [DONE]."""
    try:
        async with aclosing(outputs):  # a client that leaves cancels this, which aborts the request
            for payload in opening:
                yield _event(payload)
            async for output in outputs:
                if output.error:
                    yield _event(errors.engine_error(output.error, output.error_status).body())
                    break
                for payload in chunks(output):
                    yield _event(payload)
    except Exception:  # after the 200 has gone out, an error can only be an event
        log.exception("stream %s failed", request_id)
        yield _event(errors.server_error().body())
    yield {"data": "[DONE]"}


# Characters Python's str.splitlines() (and so httpx's iter_lines) ends a line at, which JSON leaves raw: escaped, a
# generated U+2028 no longer cuts a client's data line in two (SSE itself ends lines only at CR and LF).
LINE_BREAKERS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _event(payload: dict) -> dict:
    """One SSE data event holding a JSON object, on one line for every client."""
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return {"data": data if data.isascii() else data.translate(LINE_BREAKERS)}  # the scan only where there is anything to escape
