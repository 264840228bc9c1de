"""The contract's error responses: 400 naming the field, 413, 429, 503, and a generic 500."""

from __future__ import annotations

import logging
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


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _validation_message(err: dict[str, Any]) -> str:
    if err.get("type") == "json_invalid":
        return "request body is not valid JSON"
    msg = str(err.get("msg", "invalid value"))
    return msg.removeprefix("Value error, ")


async def api_error_response(request: Request, exc: ApiError) -> JSONResponse:
    body = {"error": exc.message, "request_id": request_id(request), **exc.extra}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into the contract's JSON errors."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": _field(tuple(e["loc"])), "message": _validation_message(e)} for e in exc.errors()]
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            errors = [{"field": "body", "message": "request body is not valid JSON"}]
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse(
            {"error": f"invalid request: {summary}", "fields": errors, "request_id": request_id(request)},
            status_code=400,
        )

    app.add_exception_handler(ApiError, api_error_response)  # type: ignore[arg-type]  # Starlette's handler type is wider

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": str(exc.detail), "request_id": request_id(request)},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request)
        log.error("unhandled error on %s %s (request %s)", request.method, request.url.path, rid, exc_info=exc)
        return JSONResponse(
            {"error": "internal server error", "request_id": rid}, status_code=500, headers={"X-Request-ID": rid}
        )
