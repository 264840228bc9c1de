"""`bentoml serve` with real Redis and PostgreSQL: shared cache and limits, and outages."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import sqlalchemy as sa

from tests.support import contract
from tests.support.servers import PostgresServer, RedisServer
from tests.support.serving import Served, post_retrying_sheds

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def backend_env(
    model_env: dict[str, str], bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    workdir = tmp_path_factory.mktemp("backends")
    return {
        "BENTOML_HOME": str(bentoml_home),
        **model_env,
        "SPILL_DIR": str(workdir / "spill"),
        "TRUSTED_PROXIES": "127.0.0.1",
        "AB_SPLIT": "0.5",
    }


@pytest.fixture(scope="module")
def stack(
    backend_env: dict[str, str],
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    """One instance, two workers, on this session's own Redis and PostgreSQL."""
    env = {**backend_env, "REDIS_URL": redis_server.url, "DATABASE_URL": postgres_server.url}
    with Served(env, tmp_path_factory.mktemp("stack") / "serve.log") as server:
        yield server


def _post(url: str, path: str, body: dict, client: str) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers={"X-Forwarded-For": client}, timeout=60)


def _answer(url: str, text: str, client: str) -> int:
    """The status of /predict for a cached `text`, a shed retried. For a cached text only the
    door guards can shed (in-flight, loop lag), and they refuse before the limiter is asked, so
    a retry does not spend a second slot of the window."""
    return post_retrying_sheds(f"{url}/predict", {"text": text}, {"X-Forwarded-For": client}).status_code


def _rows(database_url: str, request_ids: list[str]) -> dict[str, int]:
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT request_id, count(*) FROM predictions WHERE request_id = ANY(:ids) GROUP BY request_id"),
            {"ids": request_ids},
        ).all()
    engine.dispose()
    return {rid: int(n) for rid, n in rows}


def test_health_reports_redis_and_postgres(stack: Served) -> None:
    body = httpx.get(f"{stack.url}/health", timeout=10).json()
    assert (body["status"], body["cache"], body["database"]) == ("ok", "ok", "ok")


def test_repeat_is_a_shared_cache_hit_that_skips_the_model(stack: Served) -> None:
    text = f"A gripping, beautifully shot thriller {uuid.uuid4()}"
    client = "203.0.113.1"
    first = _post(stack.url, "/predict", {"text": text}, client).json()
    inferred = stack.inferred_texts()
    # 2 workers: over several repeats some land on the other worker; all must be hits
    repeats = [_post(stack.url, "/predict", {"text": text}, client).json() for _ in range(6)]
    assert first["cached"] is False
    assert all(r["cached"] is True for r in repeats)
    assert stack.inferred_texts() == inferred  # the model was not called again


def test_another_model_never_reads_the_first_models_entry(stack: Served) -> None:
    text = f"Dull and far too long {uuid.uuid4()}"
    client = "203.0.113.2"
    a = _post(stack.url, "/predict", {"text": text}, client).json()
    user_b = next(u for u in (f"user-{i}" for i in range(100)) if _variant(stack, u) == "B")
    b = _post(stack.url, "/predict/ab", {"text": text, "user_id": user_b}, client).json()
    assert a["model"] != b["model"]
    assert b["cached"] is False


def _variant(stack: Served, user: str) -> str:
    r = _post(stack.url, "/predict/ab", {"text": f"probe {uuid.uuid4()}", "user_id": user}, "203.0.113.3")
    return r.json()["variant"]


def test_batch_infers_only_the_uncached_half(stack: Served) -> None:
    tag = uuid.uuid4()
    texts = [f"text {i} was {'lovely' if i % 2 else 'awful'} {tag}" for i in range(8)]
    client = "203.0.113.4"
    _post(stack.url, "/batch", {"texts": texts[:4]}, client)
    inferred = stack.inferred_texts()
    body = _post(stack.url, "/batch", {"texts": texts}, client).json()
    assert body["count"] == 8 and body["cached_count"] == 4
    assert [p["cached"] for p in body["predictions"]] == [True] * 4 + [False] * 4
    assert stack.inferred_texts() - inferred == 4


def test_limit_is_exact_across_workers_and_instances(
    stack: Served,
    backend_env: dict[str, str],
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path: Path,
) -> None:
    client = f"198.51.100.{uuid.uuid4().int % 250}"
    text = f"limit probe {uuid.uuid4()}"
    assert _answer(stack.url, text, "203.0.113.10") == 200  # cached: no request below waits for the model
    with cf.ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(lambda _: _answer(stack.url, text, client), range(200)))
    assert statuses.count(200) == 100 and statuses.count(429) == 100

    env = {**backend_env, "REDIS_URL": redis_server.url, "DATABASE_URL": postgres_server.url}
    second = Served(env, tmp_path / "second.log")
    try:  # the stop is registered before the start: a start that times out is stopped too
        second.start()
        other = f"198.18.0.{uuid.uuid4().int % 250}"  # another network: never a client above
        urls = [stack.url, second.url] * 100
        with cf.ThreadPoolExecutor(50) as pool:
            both = list(pool.map(lambda u: _answer(u, text, other), urls))
    finally:
        second.stop()
    assert both.count(200) == 100 and both.count(429) == 100


def test_redis_outage_degrades_then_recovers_without_restart(stack: Served, redis_server: RedisServer) -> None:
    client = "203.0.113.9"
    redis_server.stop()
    try:
        texts = [f"outage text {i} {uuid.uuid4()}" for i in range(5)]
        answers = [_post(stack.url, "/predict", {"text": t}, client) for t in texts + texts]
        assert [r.status_code for r in answers] == [200] * 10
        assert not any(r.json()["cached"] for r in answers)  # uncached while Redis is down
        # /health reports the watcher's state (refreshed every 2 s) and the cache's last call
        health = _health_until(stack.url, lambda h: h["cache"] == "down")
        assert health["status"] == "degraded" and health["cache"] == "down"
    finally:
        redis_server.start()
    text = f"after the outage {uuid.uuid4()}"
    deadline = time.monotonic() + 20
    while True:
        first = _post(stack.url, "/predict", {"text": text}, client).json()
        second = _post(stack.url, "/predict", {"text": text}, client).json()
        if second["cached"] or time.monotonic() > deadline:
            break
        text = f"after the outage {uuid.uuid4()}"
        time.sleep(0.5)
    assert first["cached"] is False and second["cached"] is True
    assert _health_until(stack.url, lambda h: h["status"] == "ok")["status"] == "ok"


def _health_until(url: str, done: Callable[[dict], bool], timeout: float = 15) -> dict:
    """/health until `done` holds of it (each worker's watcher refreshes every 2 s), or the last."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{url}/health", timeout=10)
        assert r.status_code == 200, r.text
        if done(r.json()) or time.monotonic() > deadline:
            return dict(r.json())
        time.sleep(0.3)


class _Traffic:
    """Steady /predict traffic from a thread; keeps the request ids of the 200 answers."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok: list[str] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                r = _post(self.url, "/predict", {"text": f"steady {n} {uuid.uuid4()}"}, f"192.0.2.{n % 200 + 1}")
                if r.status_code == 200:
                    self.ok.append(r.json()["request_id"])
                else:
                    self.failed += 1
            except httpx.HTTPError:
                self.failed += 1
            time.sleep(0.02)

    def __enter__(self) -> _Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _wait_rows(database_url: str, ids: list[str], timeout: float = 30) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _rows(database_url, ids)
        if len(rows) == len(ids) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def test_postgres_outage_loses_and_duplicates_nothing(stack: Served, postgres_server: PostgresServer) -> None:
    with _Traffic(stack.url) as traffic:
        time.sleep(2)
        postgres_server.stop()
        try:
            time.sleep(6)
            health = _health_until(stack.url, lambda h: h["database"] == "down")
            assert health["database"] == "down" and health["status"] == "degraded"
            summary = httpx.get(f"{stack.url}/analytics/summary", timeout=30)
            assert summary.status_code == 503 and summary.headers["Retry-After"], summary.text
            rid = traffic.ok[-1]
            feedback = _post(stack.url, "/feedback", {"request_id": rid, "label": "positive"}, "192.0.2.250")
            assert feedback.status_code == 503 and "database" in feedback.json()["error"]
        finally:
            postgres_server.start()
        time.sleep(2)
    assert len(traffic.ok) > 50 and traffic.failed == 0
    rows = _wait_rows(postgres_server.url, traffic.ok)
    assert len(rows) == len(traffic.ok), f"{len(traffic.ok) - len(rows)} answered predictions have no row"
    assert set(rows.values()) == {1}


def _workers(server: Served) -> list[psutil.Process]:
    """The BentoML worker processes of `server`: its descendants that load the service."""
    assert server.proc is not None
    parent = psutil.Process(server.proc.pid)
    return [p for p in parent.children(recursive=True) if "_bentoml_impl.worker" in " ".join(p.cmdline())]


def test_a_sigkilled_worker_loses_no_answered_row(stack: Served, postgres_server: PostgresServer) -> None:
    """Each row is in the worker's local log before its answer leaves: a worker killed with rows
    not yet shipped loses none of them; the other worker (or the restarted one) ships its log."""
    workers = _workers(stack)
    assert len(workers) == 2, workers
    with _Traffic(stack.url) as traffic:
        time.sleep(3)
        workers[0].kill()
        time.sleep(6)  # BentoML starts a new worker meanwhile
    assert len(traffic.ok) > 50
    rows = _wait_rows(postgres_server.url, traffic.ok, timeout=60)
    assert len(rows) == len(traffic.ok), f"{len(traffic.ok) - len(rows)} answered predictions have no row"
    assert set(rows.values()) == {1}
    httpx.get(f"{stack.url}/readyz", timeout=30).raise_for_status()


def test_predictions_go_on_while_the_database_is_blackholed(stack: Served, postgres_server: PostgresServer) -> None:
    """PostgreSQL stopped with SIGSTOP: connections stay open and never answer. Predictions are
    answered all along, /analytics answers 503 in bounded time, and every row arrives after."""
    with _Traffic(stack.url) as traffic:
        time.sleep(2)
        with postgres_server.frozen():
            time.sleep(8)
            started = time.monotonic()
            summary = httpx.get(f"{stack.url}/analytics/summary", timeout=60)
            took = time.monotonic() - started
            assert summary.status_code == 503, f"{summary.status_code} with the database frozen: {summary.text}"
            assert took < 30
            during = len(traffic.ok)
            time.sleep(3)
            assert len(traffic.ok) > during, "predictions stalled behind the database"
        time.sleep(2)
    assert traffic.failed == 0
    rows = _wait_rows(postgres_server.url, traffic.ok, timeout=90)
    assert len(rows) == len(traffic.ok), f"{len(traffic.ok) - len(rows)} answered predictions have no row"


def test_service_restart_during_outage_replays_the_spill_file(
    backend_env: dict[str, str],
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path: Path,
) -> None:
    env = {**backend_env, "REDIS_URL": redis_server.url, "DATABASE_URL": postgres_server.url}
    first, second = Served(env, tmp_path / "first.log"), Served(env, tmp_path / "second.log")
    answered: list[str] = []
    try:  # the stops are registered before the starts
        first.start()
        postgres_server.stop()
        try:
            with _Traffic(first.url) as traffic:
                time.sleep(4)
            answered += traffic.ok
            first.stop()  # SIGTERM during the outage: the rows stay in the workers' logs
            assert list(Path(env["SPILL_DIR"]).glob("*.jsonl")), "no row waits in a log"
            second.start()
        finally:
            postgres_server.start()
        with _Traffic(second.url) as traffic:
            time.sleep(3)
        answered += traffic.ok
    finally:
        second.stop()
        first.stop()
    assert len(answered) > 50
    rows = _wait_rows(postgres_server.url, answered)
    assert len(rows) == len(answered), f"{len(answered) - len(rows)} answered predictions have no row"
    assert set(rows.values()) == {1}


def test_contract_checks_pass_against_bentoml_serve(stack: Served) -> None:
    """The checks `make test-containers` runs against the image, here against bentoml serve."""
    results = contract.run(stack.url)
    assert len(results) == len(contract.CHECKS) >= 14
    failed = [(name, problem) for name, problem in results if problem]
    assert not failed, failed
