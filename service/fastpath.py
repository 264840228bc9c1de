"""The HTTP path of the prediction APIs: a request to /predict, /predict/ab or /batch is read,
validated and answered here, after the guards, without BentoML's API layer in between.

The three are `@bentoml.api` methods (service.py): BentoML's schema, clients and composition
see them. Served through BentoML's own endpoint instead, each request would also pass its
request context, its JSON serde (a second validation into a model built from the signature),
`inspect.signature` of the method and its error handling, which answers with bodies of its own
shape (docs/decisions.md, "The prediction APIs are BentoML APIs, answered by the short path").
Here the body is validated once, with the contract's model, the same handler the API method
calls is awaited, and errors are the contract's JSON (errors.py). One exception passes on to
BentoML: its pickled calls between the services of one deployment (`bentoml.depends` under
`bentoml serve`), which BentoML itself refuses on the entry service, as this middleware does.

FastAPI's dependency machinery never runs here: `routes_of` refuses, when the service module is
imported, any API whose request would need a dependency resolved (a `Depends` in its method's or
its handler's signature, an app-wide dependency, or an app route on its path that the short path
would shadow), rather than answer it without that dependency.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import bentoml
from bentoml._internal.context import server_context
from fastapi import FastAPI, params
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, api_error_response, error_response, invalid_response, scope_request_id
from service.workarounds import api_routes, newline_alias

log = logging.getLogger("sentiment.errors")

# handler(service instance, validated body, request, response carrying extra headers)
Handler = Callable[[Any, Any, Request, Response], Awaitable[BaseModel]]
PICKLE = b"application/vnd.bentoml+pickle"


@dataclass(frozen=True)
class Route:
    """An API's path, the contract's model of its body, and the handler its method calls."""

    body: type[BaseModel]
    handler: Handler


def media_type(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower()
    return None


def is_json(media: bytes | None) -> bool:
    """JSON by its media type, or by default when none is given (as FastAPI took it)."""
    return (
        media is None
        or media == b"application/json"
        or (media.startswith(b"application/") and media.endswith(b"+json"))
    )


class ShortPath:
    """POST requests to `routes`: the contract's answer for every one of them, here."""

    def __init__(self, app: ASGIApp, routes: Mapping[str, Route]) -> None:
        self.app = app
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            if scope["type"] == "http" and newline_alias(scope["path"], self.routes):
                unknown = f"not found: {scope['method']} {scope['path']!r}"
                await error_response(scope, 404, unknown)(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        media = media_type(scope["headers"])
        if media == PICKLE and server_context.service_type == "service":
            await self.app(scope, receive, send)  # a dependency's caller in the same deployment
            return
        messages: list[Message] = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        if messages[-1]["type"] != "http.request":
            return  # the client went away before its body was whole: nobody to answer
        if not is_json(media):
            given = media.decode("latin-1") if media else ""
            problem = {"loc": ("body",), "msg": f"must be application/json, not {given}"}
            await invalid_response(scope, [problem])(scope, receive, send)
            return
        raw = b"".join(m.get("body", b"") for m in messages)
        try:
            body = route.body.model_validate_json(raw)
        except ValidationError as exc:
            await invalid_response(scope, _problems(route.body, raw, exc))(scope, receive, send)
            return
        request = Request(scope, receive)  # its body already read, above
        carrier = Response()  # headers the handler sets (RateLimit)
        del carrier.headers["content-length"]
        try:
            result = await route.handler(bentoml.get_current_service(), body, request, carrier)
        except ApiError as exc:
            await api_error_response(scope, exc)(scope, receive, send)
            return
        except Exception:
            # Outside the FastAPI app no handler of errors.py is behind this: BentoML's outer
            # app would answer a plain-text 500 (an HTML traceback in its debug mode).
            log.exception("unhandled error on POST %s (request %s)", scope["path"], scope_request_id(scope))
            await error_response(scope, 500, "internal server error")(scope, receive, send)
            return
        payload = result.__pydantic_serializer__.to_json(result, by_alias=True)
        length = str(len(payload)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", length), *carrier.headers.raw]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _problems(model: type[BaseModel], raw: bytes, exc: ValidationError) -> list[Any]:
    """What is wrong with a body that did not validate. Where pydantic's parser refused the
    JSON itself, Python's parser is asked too (as FastAPI parsed bodies): JSON with a lone
    surrogate escape is valid there, and the field holding it is named by the model's check."""
    errors: list[Any] = exc.errors(include_url=False)
    if not any(e["type"] == "json_invalid" for e in errors):
        return errors
    try:
        data = json.loads(raw)
    except RecursionError:
        return [{"loc": ("body",), "msg": "nested too deeply"}]
    except ValueError:
        return errors
    try:
        model.model_validate(data)
    except ValidationError as again:
        return again.errors(include_url=False)
    return errors


def _depends(func: Any) -> list[str]:
    """The parameters of `func` whose default is a FastAPI dependency (Depends, Security)."""
    return [p.name for p in inspect.signature(func).parameters.values() if isinstance(p.default, params.Depends)]


def routes_of(service: Any, app: FastAPI, handlers: Mapping[str, tuple[type[BaseModel], Handler]]) -> dict[str, Route]:
    """{path: Route} for the service's APIs named in `handlers` ({API name: (body model, handler)}).

    RuntimeError, at import, for an API the short path would answer without a dependency its
    request needs: the short path calls the handler directly, and FastAPI resolves nothing."""
    missing = set(handlers) - set(service.apis)
    if missing:
        raise RuntimeError(f"no @bentoml.api named {sorted(missing)}")
    routes = {service.apis[name].route: Route(body, handler) for name, (body, handler) in handlers.items()}
    if app.router.dependencies:
        raise RuntimeError(f"the app's dependencies would not run for {sorted(routes)} (service/fastpath.py)")
    for name, (body, handler) in handlers.items():
        api = service.apis[name]
        skipped = [f"{name}({p})" for p in _depends(api.func)]
        skipped += [f"{handler.__qualname__}({p})" for p in _depends(handler)]
        if skipped:
            raise RuntimeError(f"{api.route}: the short path would not resolve the dependencies of {skipped}")
        if not issubclass(api.input_spec, body):  # BentoML's input_spec subclasses the model it was given
            raise RuntimeError(f"{api.route}: the short path validates {body.__name__}, the API {api.input_spec}")
    for route in api_routes(app.routes):
        if route.path in routes and "POST" in (route.methods or ()):
            raise RuntimeError(
                f"POST {route.path} ({route.name}): the short path answers it, so this route and its"
                f" dependencies would never run"
            )
    return routes
