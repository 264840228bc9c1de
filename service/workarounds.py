"""Every place the service works around FastAPI, Starlette, BentoML or uvicorn, each with why.

- `current_service`, `self_on_the_loop`: BentoML's `self` dependency runs in FastAPI's thread pool.
- `api_routes`: BentoML moves the class's routes into a router the app includes.
- `JsonErrors`: BentoML's own app answers unrouted paths and methods in plain text.
- `install`: Starlette's 405 names one route's methods; FastAPI's JSON parser may recurse too deep.
- `newline_alias`: Starlette's route patterns also match a path with one final newline.
- `cap_send_buffers`: uvicorn hands over no accepted socket, and the kernel lets a send buffer grow to 4 MiB.
- `openapi_document`: BentoML's document lists errors of its own shape and loses `| None`.
"""

from __future__ import annotations

import functools
import inspect
import os
import socket
from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any

import bentoml
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import schemas
from service.errors import error_response


async def current_service() -> Any:
    """BentoML hands the endpoints their `self` through Depends(get_current_service), a plain
    function that FastAPI runs in its thread pool: a thread hand-off on every request. The same
    lookup as a coroutine runs on the event loop."""
    return bentoml.get_current_service()


def self_on_the_loop(routes: Sequence[Any]) -> int:
    """Point the class views' `self` dependency at `current_service`, in the routes' own
    signatures (those BentoML moved into an included router too, from whose signatures FastAPI
    builds the routes it serves, at the first request); the number of endpoints rewired.

    Not through `app.dependency_overrides`: while any override is set, FastAPI rebuilds the
    dependency tree of every dependency of every request (docs/performance.md)."""
    rewired = 0
    for route in api_routes(routes):
        endpoint: Any = route.endpoint
        signature = inspect.signature(endpoint)
        params = list(signature.parameters.values())
        if params and getattr(params[0].default, "dependency", None) is bentoml.get_current_service:
            params[0] = params[0].replace(default=Depends(current_service))
            endpoint.__signature__ = signature.replace(parameters=params)
            for dependency in route.dependant.dependencies:  # the route as already analysed
                if dependency.call is bentoml.get_current_service:
                    dependency.call = current_service
            rewired += 1
    return rewired


def api_routes(routes: Sequence[Any]) -> Iterator[APIRoute]:
    """The app's endpoints, in order. BentoML moves the class's routes into a router included in
    the app, which FastAPI keeps as one route holding that router (`original_router`)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from api_routes(included.routes)


def route_paths(routes: Sequence[Any]) -> list[str]:
    """The paths of the app's endpoints (those in its OpenAPI document)."""
    return [route.path for route in api_routes(routes) if route.include_in_schema]


class JsonErrors:
    """BentoML's own app answers a path no route matches (the mounted app's included) with a
    plain-text 404, and a path whose route takes other methods (the prediction APIs take POST
    only) with a plain-text 405; the contract wants every error as JSON with a request id.
    Added to BentoML's outer app, it rewrites only those answers, keeping their `Allow`: every
    other response passes untouched."""

    REWRITTEN = {404: "not found", 405: "method not allowed"}

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rewriting: dict[str, str] | None = None
        status = 0

        async def send_json(message: Message) -> None:
            nonlocal rewriting, status
            if message["type"] == "http.response.start" and message["status"] in self.REWRITTEN:
                given = dict(message.get("headers", []))
                if given.get(b"content-type", b"").startswith(b"text/plain"):
                    status = message["status"]
                    rewriting = {"Allow": given[b"allow"].decode()} if b"allow" in given else {}
            if rewriting is None:
                await send(message)
                return
            if message["type"] == "http.response.start" or message.get("more_body"):
                return  # sent with the body below, once its length is known
            problem = f"{self.REWRITTEN[status]}: {scope['method']} {scope['path']}"
            await error_response(scope, status, problem, rewriting)(scope, receive, send)

        await self.app(scope, receive, send_json)


def install(app: FastAPI) -> None:
    """The app's handlers for two framework answers (errors.install has the contract's others)."""

    async def _method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
        # Starlette's Allow names the methods of the first route whose path matched only (GET
        # for /jobs/{id}, which DELETE shares with another route): every route's here.
        assert isinstance(exc, StarletteHTTPException)
        headers = {**(exc.headers or {}), "Allow": ", ".join(allowed_methods(request.app, request.scope))}
        return error_response(request.scope, 405, str(exc.detail), headers)

    async def _too_deep(request: Request, exc: Exception) -> JSONResponse:
        # json.loads of a body nested thousands deep (FastAPI parses /predict's this way when
        # the short path refused it): the client's error, not the service's.
        return error_response(request.scope, 400, "invalid request: body: nested too deeply")

    app.add_exception_handler(405, _method_not_allowed)
    app.add_exception_handler(RecursionError, _too_deep)


def allowed_methods(app: Any, scope: MutableMapping[str, Any]) -> list[str]:
    """Every method some route of `app` takes at the request's path (OPTIONS and HEAD included
    where Starlette adds them)."""
    methods: set[str] = set()
    stack = list(app.routes)
    while stack:
        route = stack.pop()
        stack.extend(getattr(getattr(route, "original_router", None), "routes", []))
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches({**scope, "method": next(iter(route_methods))})[0] == Match.FULL:
            methods |= set(route_methods)
    return sorted(methods)


def newline_alias(path: str, paths: Sequence[str] | MutableMapping[str, Any]) -> bool:
    """Whether `path` is one of `paths` with a final newline (`/predict%0A`): Starlette's route
    pattern ends in `$`, which matches before it, so BentoML's endpoint would answer it."""
    return path.endswith("\n") and path[:-1] in paths


def cap_send_buffers(nbytes: int) -> int:
    """Set SO_SNDBUF on this process's listening TCP sockets, which the connections they accept
    inherit; returns how many were set (0 with `nbytes` 0, which keeps the kernel's autotuning).

    Left to the kernel, an unread results stream's buffer grew to 4 MiB before a send blocked
    (docs/decisions.md, "Small send buffers for every connection"). Neither uvicorn nor the ASGI
    scope hands the accepted sockets over, and BentoML's workers get the listening one as a
    descriptor, so it is found among the process's descriptors (Linux's /proc; elsewhere
    nothing is set)."""
    if nbytes <= 0:
        return 0
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return 0
    count = 0
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # not a socket, or the listing's own descriptor, closed since
            continue
        try:
            listening = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
            if listening and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes)
                count += 1
        except OSError:
            pass
        finally:
            sock.detach()  # the descriptor stays open, owned by whoever opened it
    return count


@functools.cache
def openapi_document(service: Any) -> dict[str, Any]:
    """BentoML's OpenAPI document of `service`, the contract's one source: the prediction APIs
    described from their @bentoml.api input and output models, the app's routes by FastAPI,
    both as BentoML merges them. Added here: the APIs' error answers, the contract's ErrorBody
    (BentoML lists errors of its own shape, which the short path never writes)."""
    spec: dict[str, Any] = service.openapi_spec.asdict()
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        components.pop(name, None)
    error = schemas.ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error.pop("$defs", {}), ErrorBody=error)
    for api in service.apis.values():
        operation = spec["paths"][api.route]["post"]
        answered = next(v for k, v in operation["responses"].items() if str(k) == "200")
        operation["responses"] = {"200": answered, **schemas.openapi_errors(400, 413, 429, 503)}
        operation["requestBody"]["required"] = True  # a request without one is a 400
        # BentoML writes an optional field (`user_id: str | None`) as a plain string; the
        # models accept null there, so the document says so, as pydantic does.
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        own = api.input_spec.model_json_schema()["properties"]
        for name in body.get("properties", {}):
            if any(choice.get("type") == "null" for choice in own.get(name, {}).get("anyOf", [])):
                body["properties"][name] = own[name]
    return spec
