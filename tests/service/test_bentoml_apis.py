"""The prediction endpoints as BentoML APIs: what BentoML's schema, clients and composition see.

Composition: a second service declaring `bentoml.depends(Sentiment)` calls `predict` and `batch`
in one process (BentoML gives it an instance of its own), and against a real `bentoml serve` of
the quick models (`bentoml.depends(Sentiment, url=...)`), whose rate limits and errors reach it
with the contract's status codes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from tests.support.serving import Served, embedded_env

APIS = {"predict": "/predict", "predict_ab": "/predict/ab", "batch": "/batch"}


@pytest.fixture(scope="module")
def served(
    service_env: dict[str, str], model_env: dict[str, str], bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("bentoml-apis")
    env = embedded_env(bentoml_home, model_env, workdir, RATE_LIMIT_PREDICT="4/minute")
    with Served(env, workdir / "serve.log", workers=1) as server:
        yield server.url


def test_schema_and_openapi_list_the_three_apis(client: TestClient) -> None:
    schema = client.get("/schema.json").json()
    routes = {r["name"]: r for r in schema["routes"]}
    assert {name: routes[name]["route"] for name in APIS} == APIS
    assert routes["batch"]["input"]["required"] == ["texts"] and routes["batch"]["batchable"] is False
    assert set(routes["predict_ab"]["input"]["properties"]) == {"text", "user_id"}
    assert "variant" in routes["predict_ab"]["output"]["properties"]
    spec = client.get("/docs.json").json()
    for name, path in APIS.items():
        operation = spec["paths"][path]["post"]
        assert operation["x-bentoml-name"] == name
        assert set(operation["responses"]) == {"200", "400", "413", "429", "503", "4XX"}, operation["responses"]
        assert operation["responses"]["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
        assert operation["requestBody"]["content"]["application/json"]["schema"]["additionalProperties"] is False
    assert "ErrorBody" in spec["components"]["schemas"] and "InvalidArgument" not in spec["components"]["schemas"]
    assert "/feedback" in spec["paths"] and "/docs.json" not in spec["paths"]


def test_a_service_composing_it_in_one_process(service_env: dict[str, str]) -> None:
    """BentoML hands the composing service an instance of Sentiment of its own (no HTTP, no
    client limits): a text the contract refuses raises pydantic's ValidationError there, naming
    the field, as the 400 over HTTP names it."""
    import bentoml
    from pydantic import ValidationError

    from service import service as module
    from service.schemas import BatchResponse, Prediction

    @bentoml.service(name="reviews-in-process")
    class Reviews:
        sentiment = bentoml.depends(module.Sentiment)

        @bentoml.api
        async def rate(self, texts: list[str]) -> dict:
            one = await self.sentiment.predict(text=texts[0])
            many = await self.sentiment.batch(texts=texts)
            return {"one": one, "many": many}

    sink = module.GUARDS.errors.sink
    reviews = Reviews()
    try:
        text = f"Lovely staff, a spotless room, and breakfast was superb. {uuid.uuid4()}"
        out = asyncio.run(reviews.rate([text, "Dreadful. Cold room, rude staff."]))
        assert isinstance(out["one"], Prediction) and isinstance(out["many"], BatchResponse)
        assert out["one"].label == "positive" and out["many"].count == 2
        assert [p.label for p in out["many"].predictions] == ["positive", "negative"]
        assert out["many"].predictions[0].cached is True  # the first call filled the cache
        with pytest.raises(ValidationError, match="text\n.*must not be blank"):
            asyncio.run(reviews.sentiment.predict(text="  "))
    finally:
        inner = reviews.sentiment
        inner.batcher.close()
        inner.analytics.close()
        module.GUARDS.errors.sink = sink


@pytest.mark.integration
def test_a_service_composing_it_by_url_and_bentomls_clients(served: str) -> None:
    """Against `bentoml serve`: the composing service gets the same answers as curl; past the
    rate limit, BentoML's clients raise with the contract's 429."""
    import importlib

    import bentoml

    sdk_service = importlib.import_module("_bentoml_sdk.service")  # the module, not bentoml.service
    from bentoml.exceptions import BentoMLException

    from service import service as module

    # BentoML's request metrics are Sentiment's in this process already
    @bentoml.service(name="reviews-by-url", metrics={"enabled": False})
    class Reviews:
        sentiment = bentoml.depends(module.Sentiment, url=served)

        @bentoml.api
        async def rate(self, texts: list[str]) -> dict:
            one = await self.sentiment.predict(text=texts[0])
            many = await self.sentiment.batch(texts=texts)
            return {"one": one.model_dump(), "many": many.model_dump()}

    texts = [f"Exactly what I hoped for. {uuid.uuid4()}", "It stopped working within a week."]
    plain = httpx.post(f"{served}/batch", json={"texts": texts}, timeout=30).json()["predictions"]
    # Its lifespan sets the dependency's client up, and BentoML's current service (one per
    # process, as each worker serves one) to itself, then to None: Sentiment's is put back.
    current = sdk_service._current_service
    try:
        with TestClient(Reviews.to_asgi()) as composing:
            r = composing.post("/rate", json={"texts": texts})
    finally:
        sdk_service.set_current_service(current)
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["one"]["label"], got["one"]["probabilities"]) == (plain[0]["label"], plain[0]["probabilities"])
    assert [p["label"] for p in got["many"]["predictions"]] == [p["label"] for p in plain]
    assert got["many"]["cached_count"] == 2

    with bentoml.SyncHTTPClient(served, server_ready_timeout=30) as sync:
        codes = []
        for i in range(6):  # 4 a minute for /predict; the composition above spent one
            try:
                sync.predict(text=f"Limits for BentoML's client too {i} {uuid.uuid4()}")
                codes.append(200)
            except BentoMLException as exc:
                codes.append(exc.error_code.value)
                assert "rate limit exceeded" in str(exc), exc
    assert codes == [200, 200, 200, 429, 429, 429], codes
