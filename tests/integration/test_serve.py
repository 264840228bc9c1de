"""End to end: a real `bentoml serve` process with two workers, on the quick models."""

from __future__ import annotations

import concurrent.futures as cf
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.serving import Served, embedded_env, post_retrying_sheds

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def served(model_env: dict[str, str], bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("serve")
    env = embedded_env(bentoml_home, model_env, workdir, TRUSTED_PROXIES="127.0.0.1")
    with Served(env, workdir / "serve.log", workers=2) as server:
        yield server.url


def test_served_predict_and_health(served: str, model_env: dict[str, str]) -> None:
    r = httpx.post(f"{served}/predict", json={"text": "An absolutely wonderful experience."}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] == "positive" and body["model"] == model_env["SENTIMENT_MODEL"]
    health = httpx.get(f"{served}/health", timeout=10).json()
    assert health["status"] == "ok" and health["cache"] == "memory" and health["database"] == "sqlite"
    bad = httpx.post(f"{served}/predict", json={"text": ""}, timeout=10)
    assert bad.status_code == 400 and "text" in bad.json()["error"]


def test_concurrent_requests_are_batched(served: str) -> None:
    texts = [f"review number {i}: the plot was {'great' if i % 2 else 'dreadful'}" for i in range(96)]

    def call(i: int) -> int:
        headers = {"X-Forwarded-For": f"198.51.100.{i % 200}"}
        return post_retrying_sheds(f"{served}/predict", {"text": texts[i]}, headers).status_code

    with cf.ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(call, range(len(texts))))
    assert statuses == [200] * len(texts)
    metrics = httpx.get(f"{served}/metrics", timeout=10).text

    def total(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(name))

    batches = total("sentiment_inference_batch_texts_count")
    texts_inferred = total("sentiment_inference_batch_texts_sum")
    assert texts_inferred >= len(texts)
    assert 0 < batches < texts_inferred, f"{batches} forward calls for {texts_inferred} texts: nothing was batched"
    assert total("sentiment_inference_queue_wait_seconds_count") >= len(texts)


def test_embedded_cache_and_limit_are_shared_by_the_workers(served: str) -> None:
    """No Redis: the two workers share one SQLite file, so every first repeat is a hit,
    whichever worker answers it, and 100/minute lets exactly 100 of 200 concurrent through."""
    for i in range(6):
        text = {"text": f"embedded repeat {i} {uuid.uuid4()}"}
        first = httpx.post(f"{served}/predict", json=text, timeout=30).json()
        repeat = httpx.post(f"{served}/predict", json=text, timeout=30).json()
        assert first["cached"] is False and repeat["cached"] is True, (i, first, repeat)
    warm = {"text": f"embedded limit {uuid.uuid4()}"}
    client = {"X-Forwarded-For": f"203.0.113.{uuid.uuid4().int % 200 + 20}"}
    # cached first, so only the door guards (before the limiter) can shed, and retries are free
    assert httpx.post(f"{served}/predict", json=warm, timeout=30).status_code == 200

    def call(_: int) -> int:
        return post_retrying_sheds(f"{served}/predict", warm, client).status_code

    with cf.ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(call, range(200)))
    assert statuses.count(200) == 100 and statuses.count(429) == 100, statuses
