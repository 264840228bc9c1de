"""The HTTP contract (docs/api.md) checked against a running service, over the network.

    python -m tests.support.contract http://127.0.0.1:3000 [--admin-key KEY]

Every endpoint and every error case of the contract, each check naming what it expects.
`make test-containers` runs it against the Bento image; the integration tests run it against
`bentoml serve`, so the checks themselves are exercised on every commit. Exit status 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Callable

import httpx

Check = Callable[[httpx.Client], None]
CHECKS: list[tuple[str, Check]] = []


def check(name: str) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        CHECKS.append((name, fn))
        return fn

    return register


def _prediction(p: dict) -> None:
    assert p["label"] in ("positive", "negative"), p
    assert 0.5 <= p["score"] <= 1.0 and abs(p["probabilities"][p["label"]] - p["score"]) < 1e-6, p
    assert abs(sum(p["probabilities"].values()) - 1) < 1e-3, p
    assert isinstance(p["cached"], bool) and p["model"] and uuid.UUID(p["request_id"]), p
    assert p["latency_ms"] >= 0, p


def _client_error(r: httpx.Response, status: int, names: str | None = None) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.text
    assert "Traceback" not in body and 'File "' not in body, body
    if names:
        assert names in body, f"the error should name {names!r}: {body}"


def _text() -> str:
    return f"The staff were friendly and the room was spotless. ({uuid.uuid4().hex[:8]})"


@check("POST /predict answers a Prediction, then the same text from the cache")
def predict(c: httpx.Client) -> None:
    text = _text()
    r = c.post("/predict", json={"text": text})
    assert r.status_code == 200, r.text
    _prediction(r.json())
    assert r.json()["cached"] is False and r.headers.get("x-request-id")
    assert "ratelimit" in r.headers and "ratelimit-policy" in r.headers, r.headers
    again = c.post("/predict", json={"text": text}).json()
    assert again["cached"] is True and again["label"] == r.json()["label"], again


@check("POST /predict/ab answers a variant and the experiment, the same variant for a user")
def predict_ab(c: httpx.Client) -> None:
    user = f"user-{uuid.uuid4().hex[:8]}"
    answers = [c.post("/predict/ab", json={"text": _text(), "user_id": user}) for _ in range(3)]
    for r in answers:
        assert r.status_code == 200, r.text
        _prediction(r.json())
        assert r.json()["variant"] in ("A", "B") and r.json()["experiment"], r.json()
    assert len({r.json()["variant"] for r in answers}) == 1


@check("POST /batch answers one Prediction per text, counting those from the cache")
def batch(c: httpx.Client) -> None:
    texts = [_text(), _text(), "Awful. Never again."]
    c.post("/predict", json={"text": texts[0]})
    r = c.post("/batch", json={"texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 3 and len(body["predictions"]) == 3 and body["cached_count"] >= 1, body
    for p in body["predictions"]:
        _prediction(p)


@check("POST /feedback accepts a label for a request id")
def feedback(c: httpx.Client) -> None:
    rid = c.post("/predict", json={"text": _text()}).json()["request_id"]
    r = c.post("/feedback", json={"request_id": rid, "label": "positive"})
    assert r.status_code == 200 and r.json() == {"accepted": True}, r.text


@check("GET /analytics/summary and /analytics/ab report the window")
def analytics(c: httpx.Client) -> None:
    s = c.get("/analytics/summary", params={"window": "15m"})
    assert s.status_code == 200, s.text
    body = s.json()
    for key in ("total", "by_endpoint", "by_model", "by_label", "cache_hit_rate", "latency_ms", "errors"):
        assert key in body, (key, body)
    assert set(body["latency_ms"]) == {"p50", "p95", "p99"}
    ab = c.get("/analytics/ab", params={"window": "15m"})
    assert ab.status_code == 200 and "variants" in ab.json() and "experiment" in ab.json(), ab.text


@check("GET /health reports the model and each dependency")
def health(c: httpx.Client) -> None:
    r = c.get("/health")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] in ("ok", "degraded") and body["model"]["A"] and body["model"]["B"], body
    assert body["cache"] in ("ok", "down", "memory") and body["database"] in ("ok", "down", "sqlite"), body
    assert body["version"], body


@check("BentoML's probes and /metrics answer")
def probes(c: httpx.Client) -> None:
    for path in ("/livez", "/readyz", "/healthz"):
        assert c.get(path).status_code == 200, path
    metrics = c.get("/metrics").text
    assert "sentiment_predictions_total" in metrics and "bentoml_service_request_total" in metrics


@check("blank, missing, mistyped and too long text: 400 naming the field")
def bad_text(c: httpx.Client) -> None:
    _client_error(c.post("/predict", json={"text": "   "}), 400, "text")
    _client_error(c.post("/predict", json={}), 400, "text")
    _client_error(c.post("/predict", json={"text": 42}), 400, "text")
    _client_error(c.post("/predict", json={"text": "a" * 5001}), 400, "text")
    _client_error(c.post("/predict/ab", json={"text": ""}), 400, "text")


@check("invalid JSON: 400")
def bad_json(c: httpx.Client) -> None:
    r = c.post("/predict", content=b'{"text": ', headers={"content-type": "application/json"})
    _client_error(r, 400)


@check("empty or oversized batch, blank item: 400 naming texts")
def bad_batch(c: httpx.Client) -> None:
    _client_error(c.post("/batch", json={"texts": []}), 400, "texts")
    _client_error(c.post("/batch", json={"texts": ["fine"] * 65}), 400, "texts")
    _client_error(c.post("/batch", json={"texts": ["fine", " "]}), 400, "texts")


@check("a body over 1 MiB: 413 before parsing")
def too_large(c: httpx.Client) -> None:
    r = c.post("/predict", content=b'{"text": "' + b"a" * (1024 * 1024 + 10) + b'"}')
    _client_error(r, 413)


@check("bad feedback: 400 naming the field")
def bad_feedback(c: httpx.Client) -> None:
    _client_error(c.post("/feedback", json={"request_id": str(uuid.uuid4()), "label": "meh"}), 400, "label")
    _client_error(c.post("/feedback", json={"request_id": "nope", "label": "positive"}), 400, "request_id")


@check("a malformed analytics window: 400 naming window")
def bad_window(c: httpx.Client) -> None:
    _client_error(c.get("/analytics/summary", params={"window": "forever"}), 400, "window")


@check("an unknown route: 404 with a JSON error and the request id")
def unknown_route(c: httpx.Client) -> None:
    r = c.post("/internal/infer", json=[{"model": "x", "text": "y"}], headers={"X-Forwarded-For": "203.0.113.9"})
    assert r.status_code == 404, (r.status_code, r.text)
    assert r.json()["request_id"] == r.headers["X-Request-ID"], r.text


@check("BentoML's clients, sync and async: the three APIs answer as over plain HTTP; errors keep their codes")
def bentoml_clients(c: httpx.Client) -> None:
    import asyncio

    import bentoml
    from bentoml.exceptions import BentoMLException

    url = str(c.base_url).rstrip("/")
    texts = [_text(), "Awful. It broke on the first day and nobody answered my emails."]
    # plain HTTP first (the cache then answers the clients: the same labels and probabilities)
    plain = c.post("/batch", json={"texts": texts}).json()["predictions"]
    user = f"user-{uuid.uuid4().hex[:8]}"
    ab = c.post("/predict/ab", json={"text": texts[1], "user_id": user}).json()

    def same(got: dict, want: dict) -> None:
        assert (got["label"], got["probabilities"]) == (want["label"], want["probabilities"]), (got, want)

    with bentoml.SyncHTTPClient(url, server_ready_timeout=30) as sync:
        assert set(sync.endpoints) >= {"predict", "predict_ab", "batch"}, sync.endpoints
        same(sync.predict(text=texts[0]), plain[0])
        batch = sync.batch(texts=texts)
        assert batch["count"] == 2 and batch["cached_count"] == 2, batch
        for got, want in zip(batch["predictions"], plain, strict=True):
            same(got, want)
        answer = sync.predict_ab(text=texts[1], user_id=user)
        same(answer, ab)
        assert answer["variant"] == ab["variant"], (answer, ab)
        try:
            sync.predict(text="   ")
        except BentoMLException as exc:
            assert exc.error_code == 400 and "text: must not be blank" in str(exc), exc
        else:
            raise AssertionError("a blank text was answered")

    async def through_async() -> None:
        async with bentoml.AsyncHTTPClient(url, server_ready_timeout=30) as client:
            same(await client.predict(text=texts[1]), plain[1])
            batch = await client.batch(texts=texts)
            for got, want in zip(batch["predictions"], plain, strict=True):
                same(got, want)
            same(await client.predict_ab(text=texts[1], user_id=user), ab)

    asyncio.run(through_async())


def run(url: str, admin_key: str | None = None, only: list[str] | None = None) -> list[tuple[str, str | None]]:
    """(check name, None or what failed) for every check."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    results: list[tuple[str, str | None]] = []
    with httpx.Client(base_url=url, timeout=60, headers=headers) as client:
        for name, fn in CHECKS:
            if only and fn.__name__ not in only:
                continue
            try:
                fn(client)
                results.append((name, None))
            except Exception as exc:  # a failed check is reported, the others still run
                results.append((name, f"{type(exc).__name__}: {exc}"[:500]))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--admin-key", default=None)
    args = parser.parse_args()
    results = run(args.url.rstrip("/"), args.admin_key)
    for name, problem in results:
        print(f"{'ok  ' if problem is None else 'FAIL'} {name}" + (f"\n     {problem}" if problem else ""))
    failed = sum(p is not None for _, p in results)
    print(f"{len(results) - failed} of {len(results)} contract checks passed against {args.url}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
