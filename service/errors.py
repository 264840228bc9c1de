"""The contract's errors: ApiError, the one body every error answer has, and its one writer
(`error_response`), which the app's exception handlers return and the guards outside the app send."""

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


def scope_request_id(scope: MutableMapping[str, Any]) -> str:
    """The request's id, as RequestContext set it in the ASGI scope (`request.state`); a new
    one outside it."""
    state = scope.setdefault("state", {})
    if "request_id" not in state:
        state["request_id"] = random_uuid()
    return str(state["request_id"])


def error_body(message: str, rid: str, **extra: Any) -> dict[str, Any]:
    """The contract's error body, the one shape every error answer of the service has."""
    return {"error": message, "request_id": rid, **extra}


def error_response(
    scope: MutableMapping[str, Any], status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """The one writer of the service's error answers: the contract's body (with `extra` fields)
    and the request's id in it and in X-Request-ID. The app's handlers return it; the guards,
    outside the app, send it: `await error_response(scope, ...)(scope, receive, send)`."""
    rid = scope_request_id(scope)
    return JSONResponse(error_body(message, rid, **extra), status, {**(headers or {}), "X-Request-ID": rid})


def api_error_response(scope: MutableMapping[str, Any], exc: ApiError) -> JSONResponse:
    """The answer to an ApiError."""
    return error_response(scope, exc.status, exc.message, exc.headers, **exc.extra)


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


def invalid_response(scope: MutableMapping[str, Any], errors: Sequence[Any]) -> JSONResponse:
    """The contract's 400 for a body that does not validate."""
    message, fields = invalid_fields(errors)
    return error_response(scope, 400, message, fields=fields)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into the contract's JSON errors."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid_response(request.scope, exc.errors())

    @app.exception_handler(ApiError)
    async def _refused(request: Request, exc: ApiError) -> JSONResponse:
        return api_error_response(request.scope, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request.scope, exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = scope_request_id(request.scope)
        log.error("unhandled error on %s %s (request %s)", request.method, request.url.path, rid, exc_info=exc)
        return error_response(request.scope, 500, "internal server error")
