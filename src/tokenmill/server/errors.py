"""OpenAI's error object, and the one place that maps failures to it."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

log = logging.getLogger(__name__)


class APIError(Exception):
    """A failure to report as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 for a client mistake."""
    return APIError(400, message, param=param, code=code)


def server_error(message: str = "The server had an error while processing your request.") -> APIError:
    return APIError(500, message, type="server_error")


def engine_error(message: str, status: int) -> APIError:
    """A request the engine ended with an error: 500, 503 (shutting down) or 408 (over its time)."""
    return APIError(status, message, type="server_error", code={408: "request_timeout", 503: "service_unavailable"}.get(status))


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error object, for the OpenAPI description."""

    error: ErrorDetail


def from_validation(exc: ValidationError) -> APIError:
    """The first pydantic complaint, named after the request field it is about."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    if error["type"] == "json_invalid":
        return invalid(f"{BAD_JSON} Parser: {error.get('ctx', {}).get('error', error['msg'])}.")
    if not loc:
        return invalid("The request body must be a JSON object with 'model' and 'prompt'.")
    if error["type"] == "extra_forbidden":  # every part is a field name here, even "123" or "str"
        name = clip(".".join(loc))
        return invalid(f"Unrecognized request argument supplied: {name}", param=name)
    param = _param(loc)
    if error["type"] == "missing":
        return invalid(f"Missing required parameter: '{param}'.", param=param)
    if param == "prompt":
        return invalid(PROMPT_TYPES, param="prompt")
    got = clip(repr(error.get("input")))
    return invalid(f"Invalid value for '{param}': {error['msg'].lower()} (got {got}).", param=param)


def clip(text, limit: int = 100) -> str:
    """A client's value as an error message quotes it: not a megabyte of it (nor 4,000 digits)."""
    text = text if isinstance(text, str) else _digits(text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _digits(value) -> str:
    """str() of a value; an int too long for str() (over 4,300 digits) is described instead."""
    try:
        return str(value)
    except ValueError:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"


BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
    "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
)
PROMPT_TYPES = "'prompt' must be a string, an array of strings, an array of token ids, or an array of token-id arrays."


def _param(loc: list[str]) -> str | None:
    """('stream_options', 'include_usage') -> 'stream_options.include_usage'; union branches dropped."""
    kept = [p for p in loc if not p.isdigit() and "[" not in p and p not in ("str", "int", "float", "bool")]
    if kept and kept[0] == "logit_bias":
        return "logit_bias"
    return ".".join(kept) or None


def install(app: FastAPI) -> None:
    """Every error the app can raise answers OpenAI's error object."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        else:
            message = str(exc.detail)
        error = APIError(exc.status_code, message, param=None)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect):
        return Response(status_code=499)  # the client left while sending its body; nobody reads this

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(server_error().body(), status_code=500)
