"""The short path refuses, when the service is built, an API whose request needs a dependency
it would not resolve: it calls the API's handler directly, without FastAPI's dependencies."""

from __future__ import annotations

from typing import Any

import bentoml
import pytest
from fastapi import Depends, FastAPI
from pydantic import BaseModel

from service import fastpath


class Body(BaseModel):
    text: str


async def caller() -> str:
    """A dependency the short path would skip (an identity check, say)."""
    return "someone"


def probe(app: FastAPI) -> Any:
    """A service with one API, /predict, whose HTTP requests the short path would answer."""

    @bentoml.service(name="short-path-probe")
    @bentoml.asgi_app(app, path="/")
    class Probe:
        @bentoml.api(route="/predict", input_spec=Body)
        async def predict(self, text: str) -> dict:
            return await self.answer(Body(text=text), None, None)

        async def answer(self, body: Body, request: Any, response: Any) -> dict:
            return {"text": body.text}

    return Probe


def test_an_api_without_dependencies_is_taken() -> None:
    app = FastAPI()
    service = probe(app)
    routes = fastpath.routes_of(service, app, {"predict": (Body, service.inner.answer)})
    assert list(routes) == ["/predict"] and routes["/predict"].body is Body


def test_a_route_with_a_dependency_on_the_apis_path_is_refused() -> None:
    """A `Depends` added to /predict as an app route: the short path would answer its requests."""
    app = FastAPI()

    @app.post("/predict", dependencies=[Depends(caller)])
    async def guarded_predict() -> dict:
        return {}

    service = probe(app)
    with pytest.raises(RuntimeError, match=r"POST /predict \(guarded_predict\).*dependencies would never run"):
        fastpath.routes_of(service, app, {"predict": (Body, service.inner.answer)})


def test_a_dependency_of_the_api_method_or_its_handler_is_refused() -> None:
    app = FastAPI()

    @bentoml.service(name="short-path-probe-depends")
    @bentoml.asgi_app(app, path="/")
    class Probe:
        @bentoml.api(route="/predict", input_spec=Body)
        async def predict(self, text: str, who: str = Depends(caller)) -> dict:
            return {}

        async def answer(self, body: Body, request: Any, response: Any, who: str = Depends(caller)) -> dict:
            return {}

    with pytest.raises(RuntimeError, match=r"/predict: .* \['predict\(who\)', 'test_.*answer\(who\)'\]"):
        fastpath.routes_of(Probe, app, {"predict": (Body, Probe.inner.answer)})


def test_an_app_wide_dependency_is_refused() -> None:
    app = FastAPI(dependencies=[Depends(caller)])
    service = probe(app)
    with pytest.raises(RuntimeError, match=r"the app's dependencies would not run for \['/predict'\]"):
        fastpath.routes_of(service, app, {"predict": (Body, service.inner.answer)})


def test_a_body_model_other_than_the_apis_is_refused() -> None:
    class Other(BaseModel):
        text: str

    app = FastAPI()
    service = probe(app)
    with pytest.raises(RuntimeError, match="the short path validates Other"):
        fastpath.routes_of(service, app, {"predict": (Other, service.inner.answer)})
