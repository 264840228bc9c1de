"""Every endpoint and every error case of the contract, through the ASGI app."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
from starlette.testclient import TestClient

from models import cpus, runtime

pytestmark = pytest.mark.slow

PREDICTION_FIELDS = {"request_id", "label", "score", "probabilities", "model", "cached", "latency_ms"}


def test_predict_returns_a_prediction(client: TestClient, headers: dict[str, str], service_env) -> None:
    r = client.post("/predict", json={"text": "What a wonderful, delightful film!"}, headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == PREDICTION_FIELDS
    assert body["label"] == "positive"
    assert body["score"] == pytest.approx(body["probabilities"]["positive"])
    assert body["model"] == service_env["SENTIMENT_MODEL"]
    uuid.UUID(body["request_id"])
    assert r.headers["X-Request-ID"]
    assert r.headers["RateLimit-Policy"] == "100;w=60"


def test_endpoints_get_the_service_without_a_thread_hop(
    client: TestClient, headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """BentoML's `self` dependency is a plain function, which FastAPI runs in its thread pool:
    the service points it at a coroutine (service/workarounds.py), so no request waits for a thread,
    and in the routes themselves, so no request rebuilds its dependency tree either (as FastAPI
    does for every request while any dependency override is set)."""
    import fastapi.dependencies.utils

    from service import service, workarounds

    hops: list[str] = []
    rebuilt: list[str] = []
    real = fastapi.dependencies.utils.run_in_threadpool
    real_get_dependant = fastapi.dependencies.utils.get_dependant

    async def counted(func, *args, **kwargs):  # type: ignore[no-untyped-def]
        hops.append(getattr(func, "__qualname__", repr(func)))
        return await real(func, *args, **kwargs)

    def analysed(*args, **kwargs):  # type: ignore[no-untyped-def]
        rebuilt.append(str(kwargs.get("path")))
        return real_get_dependant(*args, **kwargs)

    # FastAPI builds the routes it serves at the first request: after that, nothing per request
    assert client.get("/health").status_code == 200
    monkeypatch.setattr(fastapi.dependencies.utils, "run_in_threadpool", counted)
    monkeypatch.setattr(fastapi.dependencies.utils, "get_dependant", analysed)
    r = client.post("/predict", json={"text": "A thread hop per request, or none?"}, headers=headers)
    assert r.status_code == 200, r.text
    assert client.get("/health").status_code == 200
    assert client.post("/feedback", json={"request_id": r.json()["request_id"], "label": "positive"}).status_code == 200
    assert hops == []
    assert rebuilt == []
    assert service.app.dependency_overrides == {}
    routes = workarounds.route_paths(service.app.routes)
    assert service.GUARDS.self_dependencies == len(routes) == 8  # every FastAPI endpoint


def test_repeat_is_served_from_cache(client: TestClient, headers: dict[str, str]) -> None:
    text = f"An awful, boring waste of time {uuid.uuid4()}"
    first = client.post("/predict", json={"text": text}, headers=headers).json()
    second = client.post("/predict", json={"text": text}, headers=headers).json()
    assert first["cached"] is False and second["cached"] is True
    assert second["label"] == first["label"] == "negative"
    assert second["probabilities"] == first["probabilities"]
    assert second["request_id"] != first["request_id"]
    # the text as the model sees it is the key: surrounding blanks do not matter
    third = client.post("/predict", json={"text": f"  {text}\n"}, headers=headers).json()
    assert third["cached"] is True


def test_ab_is_sticky_and_names_variant_and_model(client: TestClient, headers: dict[str, str], service_env) -> None:
    models = {"A": service_env["SENTIMENT_MODEL"], "B": service_env["AB_MODEL_B"]}
    seen = set()
    for user in (f"user-{i}" for i in range(12)):
        answers = [
            client.post("/predict/ab", json={"text": f"fine {k}", "user_id": user}, headers=headers).json()
            for k in range(2)
        ]
        assert answers[0]["variant"] == answers[1]["variant"]
        assert answers[0]["model"] == models[answers[0]["variant"]]
        assert answers[0]["experiment"]
        seen.add(answers[0]["variant"])
    assert seen == {"A", "B"}
    anonymous = client.post("/predict/ab", json={"text": "no user id"}, headers=headers)
    assert anonymous.status_code == 200 and anonymous.json()["variant"] in ("A", "B")


def test_batch_answers_in_order_and_counts_cached(client: TestClient, headers: dict[str, str], service_env) -> None:
    # In the texts' order: each answer is the model's own output for its text. The quick model may
    # call a borderline text either way, so probabilities are compared, not labels; and the int8
    # model quantizes activations per forward call, so the expected values come from the same
    # calls the service will make: the first text alone (its /predict), the two misses together.
    # Two positive texts can both sit near 1.0, so the texts are picked (a fresh tag each try)
    # before any request until their three probabilities differ, or the order would not show.
    model = runtime.load(service_env["SENTIMENT_MODEL"])
    for _ in range(20):
        tag = uuid.uuid4()
        texts = [f"I love it {tag}", f"I hate it, terrible {tag}", f"Brilliant and moving {tag}"]
        expected = [p.probabilities["positive"] for p in model.predict(texts[:1]) + model.predict(texts[1:])]
        if min(abs(a - b) for i, a in enumerate(expected) for b in expected[i + 1 :]) > 1e-3:
            break
    else:
        pytest.fail(f"no tag in 20 gave three texts with distinct probabilities; last {expected}")
    client.post("/predict", json={"text": texts[0]}, headers=headers)
    r = client.post("/batch", json={"texts": texts}, headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 3 and body["cached_count"] == 1
    assert [p["cached"] for p in body["predictions"]] == [True, False, False]
    got = [p["probabilities"]["positive"] for p in body["predictions"]]
    assert got == pytest.approx(expected, abs=1e-4)
    assert r.headers["RateLimit-Policy"] == "20;w=60"


def test_feedback_and_analytics(client: TestClient, headers: dict[str, str]) -> None:
    pred = client.post("/predict/ab", json={"text": "great stuff", "user_id": "fb-user"}, headers=headers).json()
    r = client.post("/feedback", json={"request_id": pred["request_id"], "label": "positive"}, headers=headers)
    assert r.status_code == 200 and r.json() == {"accepted": True}
    from service.service import bentoml

    bentoml.get_current_service().analytics.flush()
    summary = client.get("/analytics/summary", params={"window": "15m"}).json()
    assert summary["total"] >= 1
    assert "/predict/ab" in summary["by_endpoint"]
    assert set(summary["latency_ms"]) == {"p50", "p95", "p99"}
    assert 0.0 <= summary["cache_hit_rate"] <= 1.0
    report = client.get("/analytics/ab").json()
    variant = report["variants"][pred["variant"]]
    assert variant["feedback"] >= 1
    low, high = variant["accuracy_ci95"]
    assert 0.0 <= low <= variant["accuracy"] <= high <= 1.0


def test_health_reports_embedded_backends(client: TestClient) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["cache"] == "memory" and body["database"] == "sqlite"
    assert body["model"]["runtimes"] == {
        body["model"]["A"]: "onnxruntime",
        body["model"]["B"]: "pytorch",
    }
    # sized by the CPUs this process may use (models/cpus.py), not the host's count
    share = cpus.available()
    assert body["model"]["cpus"] == {"available": share.cpus, "from": share.source}
    assert body["model"]["workers"] == 1  # SERVICE_WORKERS of the test environment
    assert body["model"]["inference_threads"] == share.cpus  # the one worker takes every CPU


@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        ("/predict", {"text": "   "}, "text"),
        ("/predict", {"text": "x" * 5001}, "text"),
        ("/predict", {"text": 42}, "text"),
        ("/predict", {}, "text"),
        ("/predict", {"text": "ok", "extra": 1}, "extra"),
        ("/predict/ab", {"text": "ok", "user_id": 7}, "user_id"),
        ("/batch", {"texts": []}, "texts"),
        ("/batch", {"texts": ["ok"] * 65}, "texts"),
        ("/batch", {"texts": ["ok", " "]}, "texts"),
        ("/batch", {"texts": "not a list"}, "texts"),
        ("/feedback", {"request_id": "nope", "label": "positive"}, "request_id"),
        ("/feedback", {"request_id": str(uuid.uuid4()), "label": "neutral"}, "label"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(
    client: TestClient, headers: dict[str, str], path: str, payload: dict, field: str
) -> None:
    r = client.post(path, json=payload, headers=headers)
    assert r.status_code == 400, r.text
    body = r.json()
    assert field in [f["field"] for f in body["fields"]]
    assert field in body["error"]
    assert "Traceback" not in r.text


def test_invalid_json_is_a_400(client: TestClient, headers: dict[str, str]) -> None:
    r = client.post("/predict", content=b'{"text": ', headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]


@pytest.mark.parametrize("window", ["forever", "740000d", "1y"])
def test_bad_window_is_a_400(client: TestClient, window: str) -> None:
    r = client.get("/analytics/summary", params={"window": window})
    assert r.status_code == 400 and "window" in r.json()["error"]


def test_lone_surrogate_is_a_400(client: TestClient, headers: dict[str, str]) -> None:
    body = b'{"text": "bad \\ud800 text"}'
    r = client.post("/predict", content=body, headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 400 and "text" in r.json()["error"]


def test_oversized_body_is_a_413_before_parsing(client: TestClient, headers: dict[str, str]) -> None:
    body = b'{"text": "' + b"a" * (1_048_576 + 10) + b'"}'
    r = client.post("/predict", content=body, headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert "MAX_BODY_BYTES" in r.json()["error"]


def test_oversized_chunked_body_is_a_413(client: TestClient, headers: dict[str, str]) -> None:
    def chunks():
        yield b'{"text": "'
        for _ in range(20):
            yield b"a" * 65_536
        yield b'"}'

    r = client.post("/predict", content=chunks(), headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 413


def test_unexpected_failure_is_a_generic_500(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import bentoml

    service = bentoml.get_current_service()

    def broken(window):
        raise RuntimeError("secret detail /etc/passwd")

    monkeypatch.setattr(service.analytics, "summary", broken)
    r = client.get("/analytics/summary")
    assert r.status_code == 500
    body = r.json()
    assert body["error"] == "internal server error"
    uuid.UUID(body["request_id"])
    assert r.headers["X-Request-ID"] == body["request_id"]
    assert "secret" not in r.text and "Traceback" not in r.text


def test_rate_limit_gives_429_with_headers(client: TestClient, headers: dict[str, str]) -> None:
    statuses = [
        client.post("/predict", json={"text": "same text for the limiter"}, headers=headers).status_code
        for _ in range(101)
    ]
    assert statuses[:100] == [200] * 100
    assert statuses[100] == 429
    r = client.post("/predict", json={"text": "same text for the limiter"}, headers=headers)
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1
    assert r.headers["RateLimit-Policy"] == "100;w=60"
    assert "remaining=0" in r.headers["RateLimit"]
    assert "rate limit" in r.json()["error"]
    other = client.post("/predict", json={"text": "another client"}, headers={"X-Forwarded-For": "203.0.113.77"})
    assert other.status_code == 200


def _remaining(response: httpx.Response) -> int:
    return int(response.headers["RateLimit"].split("remaining=")[1].split(",")[0])


def test_entries_a_client_writes_do_not_change_its_limit_identity(client: TestClient, ip: str) -> None:
    """Through the trusted proxy (the test client's peer, which appends), whatever a client writes
    to the left of its address counts against the same window: the rightmost untrusted address."""
    text = {"text": f"Identity check {uuid.uuid4()}"}
    seen = [
        _remaining(client.post("/predict", json=text, headers={"X-Forwarded-For": f"{spoof}{ip}"}))
        for spoof in ("", "203.0.113.77, ", "10.0.0.1, 198.51.100.3, ", "not-an-ip, ")
    ]
    assert seen == [seen[0] - i for i in range(4)]


def test_a_direct_client_cannot_claim_another_address(client: TestClient) -> None:
    """A peer outside TRUSTED_PROXIES is its own identity, whatever X-Forwarded-For it sends."""
    direct = TestClient(client.app, client=(f"198.51.100.{uuid.uuid4().int % 200 + 20}", 4000))
    text = {"text": f"Direct client {uuid.uuid4()}"}
    claims = ("203.0.113.1", "203.0.113.2", "10.0.0.1")
    seen = [_remaining(direct.post("/predict", json=text, headers={"X-Forwarded-For": c})) for c in claims]
    assert seen == [seen[0] - i for i in range(3)]


def test_feedback_takes_only_ids_the_service_issued(client: TestClient, headers: dict[str, str]) -> None:
    invented = client.post("/feedback", json={"request_id": str(uuid.uuid4()), "label": "positive"}, headers=headers)
    assert invented.status_code == 404 and "request_id" in invented.json()["error"]
    issued = client.post("/predict", json={"text": f"Feedback id {uuid.uuid4()}"}, headers=headers).json()
    ok = client.post("/feedback", json={"request_id": issued["request_id"], "label": "negative"}, headers=headers)
    assert ok.status_code == 200 and "RateLimit" in ok.headers
    assert uuid.UUID(issued["request_id"]).version == 4


def test_nul_in_text_is_refused_naming_the_field(client: TestClient, headers: dict[str, str]) -> None:
    for path, body, field in (
        ("/predict", {"text": "bad\u0000text"}, "text"),
        ("/batch", {"texts": ["fine", "bad\u0000"]}, "texts"),
    ):
        r = client.post(path, content=json.dumps(body), headers={**headers, "content-type": "application/json"})
        assert r.status_code == 400 and field in r.json()["error"] and "NUL" in r.json()["error"], r.text


def test_overload_is_a_503_with_retry_after_but_cached_texts_are_answered(
    client: TestClient, headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from service.service import bentoml

    service = bentoml.get_current_service()
    cached_text = f"Cached before the overload {uuid.uuid4()}"
    assert client.post("/predict", json={"text": cached_text}, headers=headers).status_code == 200
    # as if every inference thread were in a forward call of 5 s: a new text would wait far
    # beyond the budget
    busy = {n: time.perf_counter() + 5 for n in range(service.batcher.threads)}
    monkeypatch.setattr(service.batcher, "_running_until", busy)
    r = client.post("/predict", json={"text": f"A new text {uuid.uuid4()}"}, headers=headers)
    assert r.status_code == 503, r.text
    assert int(r.headers["Retry-After"]) >= 5
    assert "overloaded" in r.json()["error"] and "Traceback" not in r.text
    hit = client.post("/predict", json={"text": cached_text}, headers=headers)
    assert hit.status_code == 200 and hit.json()["cached"] is True


def test_admin_key_guards_analytics(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import SecretStr

    from service import service as module

    key = "k" * 40
    monkeypatch.setattr(module.settings, "admin_api_key", SecretStr(key))
    assert client.get("/analytics/summary").status_code == 401
    assert client.get("/analytics/ab", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.get("/analytics/summary", headers={"Authorization": f"Bearer {key}"})
    assert ok.status_code == 200 and "total" in ok.json()


def test_the_guards_and_labels_cover_every_route_of_the_contract(client: TestClient) -> None:
    from prometheus_client import generate_latest

    from service import metrics
    from service import service as module

    contract = {"/predict", "/predict/ab", "/batch", "/feedback", "/analytics/summary", "/analytics/ab"}
    contract |= {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/results"}
    assert set(module.GUARDS.public_paths) == contract
    assert metrics.endpoint_label("/jobs/1f0c/results") == "/jobs/{job_id}/results"
    assert metrics.endpoint_label("/jobs/1f0c") == "/jobs/{job_id}" and metrics.endpoint_label("/nope") == "other"
    assert set(metrics.ENDPOINTS) == contract | {"/health"}
    assert set(module.GUARDS.bentoml_skip) == contract | {"/health"}
    exposed = generate_latest().decode()
    for path in contract:  # every refusal series exists from the start, at zero or more
        assert f'sentiment_overload_rejections_total{{endpoint="{path}",reason="loop_lag"}}' in exposed


def test_each_worker_limits_its_requests_adaptively_and_exposes_the_limit(client: TestClient) -> None:
    from prometheus_client import generate_latest

    from service import service as module
    from service.overload import InFlightLimit

    guard = next(options for cls, options in module.Sentiment.middlewares if cls is InFlightLimit)
    assert guard["adaptive"] is module.GUARDS.concurrency
    assert guard["sampled"] == ("/predict", "/batch")
    assert module.GUARDS.concurrency.target_s == module.settings.max_queue_delay_ms / 1000
    exposed = 0.0
    for _ in range(50):  # the gauge watcher refreshes every 2 s; earlier tests may have moved the limit
        line = next(x for x in generate_latest().decode().splitlines() if x.startswith("sentiment_concurrency_limit "))
        exposed = float(line.split()[1])
        if exposed == pytest.approx(module.GUARDS.concurrency.limit):
            break
        time.sleep(0.1)
    assert exposed == pytest.approx(module.GUARDS.concurrency.limit)


def test_prediction_apis_are_answered_without_bentomls_api_layer(
    client: TestClient, headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """/predict, /predict/ab and /batch are @bentoml.api methods whose HTTP requests the short
    path answers (service/fastpath.py): BentoML's own endpoint never runs for them, bodies that
    do not validate get the contract's 400 naming the field, and a pickled body (BentoML's
    internal media type) is refused like any other body that is not JSON."""
    from _bentoml_impl.server.app import ServiceAppFactory

    handled: list[str] = []
    real = ServiceAppFactory.api_endpoint

    async def counted(self, name, request):  # type: ignore[no-untyped-def]
        handled.append(name)
        return await real(self, name, request)

    monkeypatch.setattr(ServiceAppFactory, "api_endpoint", counted)
    text = f"The short path, or BentoML's {uuid.uuid4()}"
    charset = {**headers, "Content-Type": "application/json; charset=utf-8"}
    short = [
        client.post("/predict", json={"text": text}, headers=headers),
        client.post("/predict/ab", json={"text": text, "user_id": "u-1"}, headers=headers),
        client.post("/batch", json={"texts": [text, "another"]}, headers=headers),
        client.post("/predict", content=json.dumps({"text": text}), headers=charset),
        client.post("/predict", content=json.dumps({"text": text}), headers=headers),  # no content type: JSON
        client.post(
            "/predict",
            content=json.dumps({"text": text}),
            headers={**headers, "Content-Type": "application/vnd.api+json"},
        ),
    ]
    assert [r.status_code for r in short] == [200] * 6, [r.text for r in short]
    assert short[0].json()["cached"] is False and short[3].json()["cached"] is True
    assert set(short[1].json()) == PREDICTION_FIELDS | {"variant", "experiment"}
    assert short[2].json()["count"] == 2
    for r in short:
        assert r.headers["content-type"] == "application/json"
        assert r.headers["RateLimit-Policy"] and r.headers["X-Request-ID"]
        assert int(r.headers["content-length"]) == len(r.content)
    bad = client.post("/predict", json={"text": "x", "extra": 1}, headers=headers)
    assert bad.status_code == 400 and bad.json()["fields"][0]["field"] == "extra", bad.text
    assert bad.json()["request_id"] == bad.headers["X-Request-ID"]
    for media in ("text/plain", "application/vnd.bentoml+pickle", "multipart/form-data"):
        other = client.post("/predict", content=json.dumps({"text": text}), headers={**headers, "Content-Type": media})
        assert other.status_code == 400 and other.json()["fields"][0]["field"] == "body", other.text
        assert f"must be application/json, not {media}" in other.json()["error"]
    deep = client.post("/batch", content=b'{"texts": ' + b"[" * 5000 + b"]" * 5000 + b"}", headers=charset)
    assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"], deep.text
    # Starlette's routes match a path with one trailing newline too: refused before BentoML's endpoint
    for path in ("/predict%0A", "/batch%0a"):
        for given in ({"json": {"text": text}}, {"files": {"text": (None, text)}}):
            trailing = client.post(path, headers=headers, **given)  # type: ignore[arg-type]
            assert trailing.status_code == 404 and trailing.json()["request_id"], trailing.text
    assert handled == []


def test_the_short_path_refuses_the_apis_once_a_dependency_would_be_skipped(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service's own wiring passes the short path's check (service/fastpath.py, routes_of,
    run when service.py is imported); a `Depends` added to /predict, or to the whole app, fails it."""
    from fastapi import Depends
    from fastapi.routing import APIRoute

    from service import fastpath
    from service import service as module
    from service.clients import require_admin

    def check() -> dict:
        return fastpath.routes_of(module.Sentiment, module.app, module.SHORT_PATH)

    assert set(check()) == {"/predict", "/predict/ab", "/batch"}

    async def predict() -> dict:
        return {}

    guarded = APIRoute("/predict", predict, methods=["POST"], dependencies=[Depends(require_admin)])
    with monkeypatch.context() as patch:
        patch.setattr(module.app.router, "routes", [*module.app.router.routes, guarded])
        with pytest.raises(RuntimeError, match=r"POST /predict \(predict\).*would never run"):
            check()
    with monkeypatch.context() as patch:
        patch.setattr(module.app.router, "dependencies", [Depends(require_admin)])
        with pytest.raises(RuntimeError, match="the app's dependencies would not run"):
            check()
    assert set(check()) == {"/predict", "/predict/ab", "/batch"}


def test_an_unexpected_failure_on_the_prediction_path_is_the_contracts_500(
    client: TestClient, headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.service import bentoml

    async def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("the model's runtime failed")

    monkeypatch.setattr(bentoml.get_current_service().predictions, "predict", broken)
    r = client.post("/predict", json={"text": f"An unexpected failure {uuid.uuid4()}"}, headers=headers)
    assert r.status_code == 500 and r.headers["content-type"] == "application/json", r.text
    assert r.json() == {"error": "internal server error", "request_id": r.headers["X-Request-ID"]}
    assert "RuntimeError" not in r.text and "Traceback" not in r.text


def test_every_error_status_carries_a_request_id(
    client: TestClient, headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One error shape for each status the service writes, whichever layer writes it."""
    from pydantic import SecretStr

    from service import service as module

    json_type = {**headers, "Content-Type": "application/json"}
    job = client.post("/jobs", json={"texts": ["an error shape test"]}, headers=headers).json()
    auth = {**headers, "Authorization": f"Bearer {job['token']}"}
    assert client.delete(f"/jobs/{job['job_id']}", headers=auth).status_code == 200

    answers = {
        "400": lambda: client.post("/predict", json={"text": ""}, headers=headers),
        "404 path": lambda: client.get("/no/such/path", headers=headers),
        "404 job": lambda: client.get(f"/jobs/{uuid.uuid4()}", headers=headers),
        "404 feedback": lambda: client.post(
            "/feedback", json={"request_id": str(uuid.uuid4()), "label": "positive"}, headers=headers
        ),
        "405": lambda: client.request("OPTIONS", f"/jobs/{job['job_id']}", headers=headers),
        "409": lambda: client.delete(f"/jobs/{job['job_id']}", headers=auth),
        "413 length": lambda: client.post("/predict", content=b"x" * 1_100_000, headers=json_type),
        "413 chunked": lambda: client.post("/predict", content=(b"x" * 65_536 for _ in range(20)), headers=json_type),
    }
    got = {name: call() for name, call in answers.items()}
    # (the 408 of a trickled upload needs a real socket: tests/integration/test_abuse.py)
    monkeypatch.setattr(module.settings, "admin_api_key", SecretStr("k" * 40))
    got["401"] = client.get("/analytics/summary", headers=headers)
    monkeypatch.setattr(module.GUARDS.concurrency, "limit", 0)  # the door refuses every prediction
    got["503 door"] = client.post("/predict", json={"text": "refused at the door"}, headers=headers)
    for name, r in got.items():
        assert r.status_code == int(name[:3]), (name, r.status_code, r.text)
        body = r.json()
        assert isinstance(body["error"], str) and body["error"], (name, body)
        uuid.UUID(body["request_id"])
        assert r.headers["X-Request-ID"] == body["request_id"], name
    assert got["405"].headers["Allow"] == "DELETE, GET"
    assert "Retry-After" in got["503 door"].headers


def test_the_admin_key_reaches_every_job(
    client: TestClient, headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import SecretStr

    from service import service as module

    job = client.post("/jobs", json={"texts": ["the admin may look"]}, headers=headers).json()
    monkeypatch.setattr(module.settings, "admin_api_key", SecretStr("k" * 40))
    admin = {**headers, "Authorization": "Bearer " + "k" * 40}
    assert client.get(f"/jobs/{job['job_id']}", headers=admin).status_code == 200
    assert (
        client.get(f"/jobs/{job['job_id']}", headers={**headers, "Authorization": "Bearer " + "k" * 39}).status_code
        == 404
    )
    assert client.delete(f"/jobs/{job['job_id']}", headers=admin).status_code in (200, 409)
