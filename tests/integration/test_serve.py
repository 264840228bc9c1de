"""End to end: a real `bentoml serve` process with two workers, on the quick models."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtests.serving import Served

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def served(quick_models: list[str], bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("serve")
    env = {
        "BENTOML_HOME": str(bentoml_home),
        "SENTIMENT_MODEL": quick_models[0],
        "AB_MODEL_B": quick_models[1],
        "DATABASE_URL": f"sqlite:///{workdir / 'analytics.db'}",
        "SPILL_DIR": str(workdir / "spill"),
        "TRUSTED_PROXIES": "127.0.0.1",
    }
    server = Served(env, workdir / "serve.log", workers=2).start()
    yield server.url
    server.stop()


def test_served_predict_and_health(served: str, quick_models: list[str]) -> None:
    r = httpx.post(f"{served}/predict", json={"text": "An absolutely wonderful experience."}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] == "positive" and body["model"] == quick_models[0]
    health = httpx.get(f"{served}/health", timeout=10).json()
    assert health["status"] == "ok" and health["cache"] == "memory" and health["database"] == "sqlite"
    bad = httpx.post(f"{served}/predict", json={"text": ""}, timeout=10)
    assert bad.status_code == 400 and "text" in bad.json()["error"]


def test_concurrent_requests_are_batched(served: str) -> None:
    texts = [f"review number {i}: the plot was {'great' if i % 2 else 'dreadful'}" for i in range(96)]

    def call(i: int) -> int:
        headers = {"X-Forwarded-For": f"198.51.100.{i % 200}"}
        return httpx.post(f"{served}/predict", json={"text": texts[i]}, headers=headers, timeout=60).status_code

    with cf.ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(call, range(len(texts))))
    assert statuses == [200] * len(texts)
    metrics = httpx.get(f"{served}/metrics", timeout=10).text
    sizes = [
        line
        for line in metrics.splitlines()
        if line.startswith("bentoml_service_adaptive_batch_size_count") and 'method_name="infer"' in line
    ]
    assert sizes, "no adaptive batching metric for infer"
    batches = sum(float(line.rsplit(" ", 1)[1]) for line in sizes)
    assert 0 < batches < len(texts), f"{batches} batches for {len(texts)} requests: nothing was batched"
