"""Around every HTTP request: its X-Request-Id, the in-flight count, a metrics count, one log line."""

from __future__ import annotations

import logging
import re
import time
import uuid

import anyio
from starlette.requests import ClientDisconnect

from tokenmill.server.lifecycle import Lifecycle
from tokenmill.server.metrics import Metrics

log = logging.getLogger("tokenmill.requests")

REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # a client's id is echoed only if it is short, printable ASCII
GONE = (ClientDisconnect, anyio.ClosedResourceError, anyio.BrokenResourceError, ConnectionError)


class RequestMiddleware:
    """A pure ASGI middleware, so that streams are counted and logged until their last byte.

    Routes add what they know to `scope["state"]`: `request_id` (a completion's id, unless the
    client sent its own), `usage` (prompt, completion tokens), `ttft` (seconds), and `on_close`, a
    callback run however the response ends (it frees a request whose outputs were never read).
    """

    def __init__(self, app, lifecycle: Lifecycle, metrics: Metrics):
        self.app, self.lifecycle, self.metrics = app, lifecycle, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        state = scope.setdefault("state", {})
        given = _header(scope, b"x-request-id")
        state["client_request_id"] = given if given and REQUEST_ID.fullmatch(given) else None
        status = 0

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                rid = state.get("client_request_id") or state.get("request_id") or "req-" + uuid.uuid4().hex
                state["request_id"] = rid
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False) and not state.get("gone"):
                state["complete"] = True  # the whole answer went out: a disconnect seen after this is no client leaving early
            await send(message)

        self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send_with_id)
        except GONE:
            status = status or 499
            state["gone"] = True
        except Exception:  # answered 500 by Starlette's outermost error middleware
            status = status or 500
            raise
        finally:
            if state.get("on_close"):
                state["on_close"]()
            self.lifecycle.in_flight -= 1
            self._record(scope, state, status or 499, time.monotonic() - started)

    def _record(self, scope, state: dict, status: int, seconds: float) -> None:
        """Count the request and write its one log line (no keys, no prompt text)."""
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(path, str(status)).inc()
        fields = {"request_id": state.get("request_id"), "method": scope["method"], "path": scope["path"], "status": status, "seconds": round(seconds, 4)}
        if "usage" in state:
            fields["prompt_tokens"], fields["completion_tokens"] = state["usage"]
        if state.get("ttft") is not None:
            fields["ttft"] = round(state["ttft"], 4)
        if state.get("gone") and not state.get("complete"):
            fields["client"] = "left"
        text = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("method", "path"))
        level = logging.DEBUG if path in ("/health", "/metrics") and status == 200 else logging.INFO
        log.log(level, "%s %s %s", scope["method"], scope["path"], text, extra={"fields": fields})


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None
