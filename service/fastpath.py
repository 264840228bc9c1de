"""The prediction endpoints' short path through the app: a valid JSON body goes from the guards
straight to the endpoint function, and its answer straight back.

A cached /predict spends most of its time in the layers around it: FastAPI's own middlewares,
its router (BentoML's class views sit in an included router, matched twice per request), the
request handler, dependency solving and response validation, each a few to tens of
microseconds, each slower still on a core that was idle (docs/performance.md). Here the same
endpoint functions are called with the same arguments FastAPI would pass, after the same
guards (this middleware is the innermost of service.py's), and errors become the same JSON
through errors.py's handler. Anything else, a body that does not validate or is not
`application/json`, is handed to FastAPI untouched, so its 400s and its OpenAPI document stay
the single source of the contract.
"""

from __future__ import annotations

import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import bentoml
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, api_error_response
from service.guards import api_routes, replaying, send_json_bytes

Endpoint = Callable[..., Awaitable[BaseModel]]


@dataclass(frozen=True)
class Route:
    """A POST endpoint taking (self, body, request, response) and answering a pydantic model."""

    body: type[BaseModel]
    endpoint: Endpoint


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


class ShortPath:
    """POST requests to `routes` with a JSON body that validates: the endpoint called here."""

    def __init__(self, app: ASGIApp, routes: dict[str, Route]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None or not _is_json(scope["headers"]):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        replay = replaying(messages, receive)
        if messages[-1]["type"] != "http.request":
            await self.app(scope, replay, send)
            return
        raw = b"".join(m.get("body", b"") for m in messages)
        try:
            body = route.body.model_validate_json(raw)
        except ValidationError:
            await self.app(scope, replay, send)  # FastAPI writes the contract's 400
            return
        request = Request(scope, replay)
        carrier = Response()  # headers the endpoint sets (RateLimit), as FastAPI's sub-response
        del carrier.headers["content-length"]
        try:
            result = await route.endpoint(bentoml.get_current_service(), body=body, request=request, response=carrier)
        except ApiError as exc:
            await (await api_error_response(request, exc))(scope, replay, send)
            return
        payload = result.__pydantic_serializer__.to_json(result, by_alias=True)
        await send_json_bytes(send, 200, payload, carrier.headers.raw)


def routes_of(app: Any, paths: Sequence[str]) -> dict[str, Route]:
    """The app's endpoint function for each POST path, with the body model it is annotated with."""
    found = {
        route.path: Route(typing.get_type_hints(route.endpoint)["body"], route.endpoint)
        for route in api_routes(app.routes)
        if route.path in paths and "POST" in (route.methods or ())
    }
    missing = set(paths) - set(found)
    if missing:
        raise RuntimeError(f"no POST route for {sorted(missing)}")
    return found
