"""What every request meets first: its id, its timing and error counts (RequestContext), and
the size limit of its body (413). The 404/405 of paths no route takes: workarounds.JsonErrors.

Imports errors, metrics and request_ids."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import error_response
from service.request_ids import random_uuid


def replaying(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that gives back the messages already read, then reads on."""

    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return replay


class BodySizeLimit:
    """413 for bodies over `max_bytes`: from Content-Length before reading anything, or, for a
    body without one (chunked), as soon as the bytes read pass the limit. Such a body is read
    here before the app sees it: FastAPI would turn an error raised mid-read into a 400. The
    `streamed` paths (POST /jobs) count their bodies themselves as they parse them, so here they
    are refused by Content-Length only, never buffered."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        larger: dict[str, tuple[int, str]] | None = None,
        streamed: Sequence[str] = (),
    ) -> None:
        """`larger`: paths with a limit of their own, {path: (bytes, the setting's name)}."""
        self.app = app
        self.max_bytes = max_bytes
        self.larger = larger or {}
        self.streamed = frozenset(streamed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes, setting = self.larger.get(scope["path"], (self.max_bytes, "MAX_BODY_BYTES"))
        error = f"request body exceeds {max_bytes} bytes ({setting})"
        length = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if length is not None or scope["path"] in self.streamed:
            if length is not None and length.isdigit() and int(length) > max_bytes:
                await error_response(scope, 413, error, {"Connection": "close"})(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > max_bytes:
                await error_response(scope, 413, error, {"Connection": "close"})(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        await self.app(scope, replaying(messages, receive), send)


class RequestContext:
    """A request id on every answer; public requests timed and counted, error answers recorded.

    A plain ASGI middleware: Starlette's `@app.middleware("http")` runs each request through an
    extra task and memory streams, measurable CPU per request (docs/performance.md).
    """

    def __init__(self, app: ASGIApp, public: Sequence[str], on_error: Callable[[str, int], None]) -> None:
        self.app = app
        self.public = tuple(public)
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = random_uuid()
        scope.setdefault("state", {})["request_id"] = rid  # request.state.request_id (errors.py)
        path = scope["path"]
        public = path.startswith(self.public) or path == "/health"
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", rid.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status = 500  # the generic 500 itself is written by errors.py
            raise
        finally:
            if public:
                endpoint = metrics.endpoint_label(path)
                metrics.HTTP_REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - started)
                metrics.HTTP_REQUESTS.labels(endpoint, str(status)).inc()
            if status >= 400:
                self.on_error(path, status)


class ErrorSink(Protocol):
    def record_error(self, endpoint: str, status: int) -> None: ...


class ErrorCounts:
    """Error answers of the public routes, for the analytics error counts: the middleware is
    built with the app at import, the analytics sink in each worker, which hands it in here."""

    def __init__(self, public: Sequence[str] = ()) -> None:
        """`public`: the paths counted, which the guards may set once the routes exist."""
        self.public = tuple(public)
        self.sink: ErrorSink | None = None

    def __call__(self, path: str, status: int) -> None:
        if self.sink is not None and path.startswith(self.public):
            self.sink.record_error(metrics.endpoint_label(path), status)
