"""The contract's error responses: 400 naming the field, 413, 429, 503, and a generic 500."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.request_ids import random_uuid

log = logging.getLogger("sentiment.errors")


class ApiError(Exception):
    """An error the client can act on, with its status and extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.extra = extra


def request_id(request: Request) -> str:
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.state.request_id = random_uuid()
    return rid


def scope_request_id(scope: MutableMapping[str, Any]) -> str:
    """The request's id, as RequestContext set it in the ASGI scope (a new one outside it)."""
    state = scope.setdefault("state", {})
    if "request_id" not in state:
        state["request_id"] = random_uuid()
    return str(state["request_id"])


def error_body(message: str, rid: str, **extra: Any) -> dict[str, Any]:
    """The contract's error body, the one shape every error answer of the service has."""
    return {"error": message, "request_id": rid, **extra}


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _validation_message(err: dict[str, Any]) -> str:
    if err.get("type") == "json_invalid":
        return "request body is not valid JSON"
    msg = str(err.get("msg", "invalid value"))
    return msg.removeprefix("Value error, ")


def invalid_fields(errors: Sequence[Any]) -> tuple[str, list[dict[str, str]]]:
    """The contract's 400 for a body that does not validate (pydantic's or FastAPI's errors):
    one message naming each field, and the fields apart."""
    fields = [{"field": _field(tuple(e["loc"])), "message": _validation_message(e)} for e in errors]
    if any(e.get("type") == "json_invalid" for e in errors):
        fields = [{"field": "body", "message": "request body is not valid JSON"}]
    return "invalid request: " + "; ".join(f"{e['field']}: {e['message']}" for e in fields), fields


async def api_error_response(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, request_id(request), **exc.extra), exc.status, exc.headers)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into the contract's JSON errors."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, fields = invalid_fields(exc.errors())
        return JSONResponse(error_body(message, request_id(request), fields=fields), 400)

    app.add_exception_handler(ApiError, api_error_response)  # type: ignore[arg-type]  # Starlette's handler type is wider

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette's Allow names the methods of the first route whose path matched only
            # (GET for /jobs/{id}, which DELETE shares with another route): every route's here.
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
        return JSONResponse(error_body(str(exc.detail), request_id(request)), exc.status_code, headers)

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        # json.loads of a body nested thousands deep (FastAPI parses /predict's this way when
        # the short path refused it): the client's error, not the service's.
        return JSONResponse(error_body("invalid request: body: nested too deeply", request_id(request)), 400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request)
        log.error("unhandled error on %s %s (request %s)", request.method, request.url.path, rid, exc_info=exc)
        return JSONResponse(error_body("internal server error", rid), 500, {"X-Request-ID": rid})


def allowed_methods(app: Any, scope: MutableMapping[str, Any]) -> list[str]:
    """Every method some route of `app` takes at the request's path (OPTIONS and HEAD included
    where Starlette adds them)."""
    from starlette.routing import Match

    methods: set[str] = set()
    stack = list(app.routes)
    while stack:
        route = stack.pop()
        stack.extend(getattr(getattr(route, "original_router", None), "routes", []))
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches({**scope, "method": next(iter(route_methods))})[0] == Match.FULL:
            methods |= set(route_methods)
    return sorted(methods)
