"""The Redis and PostgreSQL backends against real servers, faults included."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from limits.aio import strategies
from limits.storage import storage_from_string
from redis import asyncio as redis_asyncio

from storage import migrate
from storage.analytics import PredictionRecord, SqlAnalyticsStore, reports, utcnow
from storage.cache import RedisPredictionCache, cache_key
from storage.ratelimit import LimitsRateLimiter, parse_limit
from tests.support.servers import PostgresServer, RedisServer

pytestmark = pytest.mark.integration


def _record(endpoint: str = "/predict", variant: str | None = None, latency: float = 10.0) -> PredictionRecord:
    return PredictionRecord(
        request_id=str(uuid.uuid4()),
        endpoint=endpoint,
        model="m:1",
        label="positive",
        score=0.9,
        cached=False,
        latency_ms=latency,
        text_sha256="0" * 64,
        text_length=5,
        variant=variant,
        text="hello",
    )


def _count(url: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        n = conn.exec_driver_sql("SELECT count(*) FROM predictions").scalar_one()
        distinct = conn.exec_driver_sql("SELECT count(DISTINCT request_id) FROM predictions").scalar_one()
    engine.dispose()
    assert n == distinct
    return int(n)


@pytest.fixture
def migrated(postgres_server: PostgresServer) -> tuple[str, int]:
    """This session's own PostgreSQL (the fault tests stop it), migrated; and its row count now."""
    migrate.upgrade(postgres_server.url)
    return postgres_server.url, _count(postgres_server.url)


def test_redis_cache_round_trip_ttl_and_model_isolation(redis_url: str) -> None:
    async def scenario() -> None:
        cache = RedisPredictionCache(redis_url, ttl_seconds=1)
        key_a, key_b = cache_key("model-a:1", "text"), cache_key("model-b:1", "text")
        await cache.set_many({key_a: {"label": "positive", "score": 0.9}})
        assert await cache.get_many([key_a, key_b]) == [{"label": "positive", "score": 0.9}, None]
        assert await cache.status() == "ok"
        await asyncio.sleep(1.2)
        assert await cache.get_many([key_a]) == [None]

    asyncio.run(scenario())


def test_redis_cache_fails_open_and_recovers(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        cache = RedisPredictionCache(redis_server.url, ttl_seconds=60)
        key = cache_key("m:1", str(uuid.uuid4()))
        assert await cache.status() == "ok"
        redis_server.stop()
        try:
            started = time.perf_counter()
            assert await cache.get_many([key]) == [None]
            await cache.set_many({key: {"label": "negative"}})
            assert time.perf_counter() - started < 2.0
            assert await cache.status() == "down"
            assert cache.errors >= 2  # the lookup and the probe; the fill was skipped (backoff)
        finally:
            redis_server.start()
        assert await cache.status() == "ok"  # the watcher's probe: the cache is used again at once
        await cache.set_many({key: {"label": "negative"}})
        assert await cache.get_many([key]) == [{"label": "negative"}]

    asyncio.run(scenario())


def test_redis_limiter_is_exact_under_concurrency(redis_url: str) -> None:
    async def scenario() -> None:
        limit = parse_limit("100/minute")
        assert limit is not None
        client = f"client-{uuid.uuid4()}"
        limiters = [LimitsRateLimiter(redis_url) for _ in range(4)]  # as if four workers
        decisions = await asyncio.gather(*(limiters[i % 4].hit("predict", client, limit) for i in range(200)))
        assert sum(d.allowed for d in decisions) == 100
        assert await LimitsRateLimiter(redis_url).status() == "ok"

    asyncio.run(scenario())


def test_redis_limiter_keeps_the_window_the_library_reads(redis_url: str) -> None:
    """The limiter's one-round-trip script keeps the moving window exactly as `limits` does:
    the library's own hit and get_window_stats see the same window, and the headers agree."""

    async def scenario() -> None:
        limit = parse_limit("5/minute")
        assert limit is not None
        client, other = f"client-{uuid.uuid4()}", f"client-{uuid.uuid4()}"
        limiter = LimitsRateLimiter(redis_url)
        decisions = [await limiter.hit("predict", client, limit) for _ in range(7)]
        assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
        assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0, 0]
        assert all(55 <= d.reset_after <= 60 for d in decisions)
        assert decisions[-1].headers()["Retry-After"] == str(decisions[-1].reset_after)

        storage = storage_from_string(f"async+{redis_url}", implementation="redispy")
        library = strategies.MovingWindowRateLimiter(storage)
        stats = await library.get_window_stats(limit, "predict", client)
        assert stats.remaining == 0
        assert abs(math.ceil(stats.reset_time - time.time()) - decisions[-1].reset_after) <= 1
        assert not await library.hit(limit, "predict", client)

        for _ in range(3):  # the library's hits count in the limiter's window
            assert await library.hit(limit, "predict", other)
        assert (await limiter.hit("predict", other, limit)).remaining == 1
        assert (await library.get_window_stats(limit, "predict", other)).remaining == 1

        await redis_asyncio.from_url(redis_url).script_flush()  # a restarted Redis forgets scripts
        decision = await limiter.hit("predict", other, limit)
        assert decision.allowed and decision.remaining == 0 and limiter.errors == 0

    asyncio.run(scenario())


def test_redis_limiter_asks_redis_once_per_request(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        limit = parse_limit("100/minute")
        assert limit is not None
        limiter = LimitsRateLimiter(redis_server.url)
        await limiter.hit("predict", "warm-up", limit)
        redis = redis_asyncio.from_url(redis_server.url)

        async def scripts_run() -> int:
            stats = await redis.info("commandstats")
            return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("eval", "evalsha"))

        before = await scripts_run()
        for _ in range(10):
            assert (await limiter.hit("predict", f"client-{uuid.uuid4()}", limit)).remaining == 99
        assert await scripts_run() - before == 10  # one script per hit: the library's calls took two

    asyncio.run(scenario())


def test_postgres_analytics_reports(database_url: str, tmp_path: Path) -> None:
    store = SqlAnalyticsStore(database_url, spill_dir=tmp_path)
    records = [_record("/predict", latency=float(i)) for i in range(1, 101)]
    records += [_record("/predict/ab", variant="A"), _record("/predict/ab", variant="B")]
    store.record(records)
    store.record_error("/predict", 429)
    store.record_error("/predict", 500)
    store.record_feedback(records[-1].request_id, "positive")
    assert store.flush() == 102
    summary = store.summary(timedelta(hours=1))
    assert summary["total"] == 102
    assert summary["by_endpoint"] == {"/predict": 100, "/predict/ab": 2}
    assert summary["latency_ms"]["p50"] == 49.5  # percentile_cont over 1..100 plus two 10s
    assert summary["rate_limited"] == 1 and summary["errors"] == 1
    report = store.ab_report(timedelta(hours=1))
    assert report["variants"]["B"]["feedback"] == 1 and report["variants"]["B"]["accuracy"] == 1.0
    assert store.status() == "ok"
    store.close()


def test_reports_count_each_stored_row_once_across_minutes_and_rewrites(database_url: str, tmp_path: Path) -> None:
    """Whole minutes come from prediction_counts, the first partial one from the rows; a row
    written again (a replay) is neither stored nor counted twice."""
    store = SqlAnalyticsStore(database_url, spill_dir=tmp_path)
    now = utcnow()
    ages = [5000, 3700, 400, 170, 130, 95, 65, 40, 10, 2]  # seconds: whole hours, minutes and a partial one
    records = []
    for i, age in enumerate(ages):
        rec = _record("/predict/ab" if i % 2 else "/predict", variant="AB"[i % 4 // 2] if i % 2 else None)
        rec.created_at = now - timedelta(seconds=age)
        rec.score = 0.5 + i / 100
        records.append(rec)
    store.record(records)
    store.flush()
    store.record(records[2:8])  # the same request ids again
    store.flush()
    assert _count(database_url) == len(ages)
    for window_s in (5, 60, 100, 150, 300, 3600, 4000, 6000):  # each at least 5 s from an age
        expected = [r for r, age in zip(records, ages, strict=True) if age < window_s]
        summary = store.summary(timedelta(seconds=window_s))
        assert summary["total"] == len(expected), window_s
        assert summary["latency_rows"] == len(expected)
        ab = [r for r in expected if r.variant]
        report = store.ab_report(timedelta(seconds=window_s))
        assert sum(v["requests"] for v in report["variants"].values()) == len(ab)
        for name, v in report["variants"].items():
            scores = [r.score for r in ab if r.variant == name]
            assert v["mean_score"] == round(sum(scores) / len(scores), 4)
    store.close()


def test_percentiles_of_a_large_window_come_from_a_page_sample(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reports, "EXACT_PERCENTILE_ROWS", 2_000)
    store = SqlAnalyticsStore(database_url, spill_dir=tmp_path, batch_size=5_000)
    latencies = [float(i) for i in range(1, 20_001)]
    random.Random(7).shuffle(latencies)
    store.record(_record(latency=lat) for lat in latencies)
    store.flush()
    summary = store.summary(timedelta(hours=1))
    assert summary["total"] == 20_000
    assert 500 < summary["latency_rows"] < 8_000  # about a tenth of the pages
    assert abs(summary["latency_ms"]["p50"] - 10_000) < 1_500
    assert abs(summary["latency_ms"]["p95"] - 19_000) < 1_000
    assert store.summary(timedelta(hours=1))["latency_ms"] == summary["latency_ms"]  # same pages each call
    monkeypatch.setattr(reports, "EXACT_PERCENTILE_ROWS", 50_000)
    exact = store.summary(timedelta(hours=1))
    assert exact["latency_rows"] == 20_000 and exact["latency_ms"]["p50"] == 10_000.5
    store.close()


def test_sqlite_percentiles_of_a_large_window_come_from_a_rowid_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded store reads about SQLITE_PERCENTILE_ROWS rows of a larger window, the same
    ones each call, for the summary and for each A/B variant, whatever order the rows were
    written in (a replayed spill log writes old rows last); older rows stay out of it."""
    monkeypatch.setattr(reports, "SQLITE_PERCENTILE_ROWS", 1_000)
    url = f"sqlite:///{tmp_path / 'a.db'}"
    migrate.upgrade(url)
    store = SqlAnalyticsStore(url, spill_dir=tmp_path / "spill", batch_size=5_000)
    old = _record(latency=1e6)
    old.created_at = utcnow() - timedelta(hours=3)
    store.record([old])
    latencies = [float(i) for i in range(1, 10_001)]
    random.Random(7).shuffle(latencies)
    # Every fifth row an A/B row, alternately A and B: a period a stride could line up with.
    store.record(
        _record("/predict/ab", variant="AB"[i // 5 % 2], latency=lat) if i % 5 == 0 else _record(latency=lat)
        for i, lat in enumerate(latencies)
    )
    store.flush()
    replayed = [_record(latency=5_000.0) for _ in range(50)]  # written last, the window's oldest
    for r in replayed:
        r.created_at = utcnow() - timedelta(minutes=50)
    store.record(replayed)
    store.flush()
    summary = store.summary(timedelta(hours=1))
    assert summary["total"] == 10_050
    assert 800 <= summary["latency_rows"] <= 1_030  # about one row in 11 (10,050 / 1,000, rounded up)
    assert abs(summary["latency_ms"]["p50"] - 5_000) < 500
    assert abs(summary["latency_ms"]["p99"] - 9_900) < 200  # the 3-hour-old 1e6 is not in it
    assert store.summary(timedelta(hours=1))["latency_ms"] == summary["latency_ms"]  # the same rows
    ab = store.ab_report(timedelta(hours=1))["variants"]
    assert ab["A"]["requests"] == ab["B"]["requests"] == 1_000
    for v in ab.values():  # 2,000 A/B rows: a stride of 2 picks about half of each variant
        assert 350 < v["latency_rows"] < 650
        assert abs(v["latency_ms"]["p50"] - 5_000) < 1_000
    monkeypatch.setattr(reports, "SQLITE_PERCENTILE_ROWS", 50_000)
    exact = store.summary(timedelta(hours=1))
    assert exact["latency_rows"] == 10_050 and exact["latency_ms"]["p50"] == 5_000.0
    store.close()


def test_rows_survive_a_postgres_outage_exactly_once(
    postgres_server: PostgresServer, migrated: tuple[str, int], tmp_path: Path
) -> None:
    url, before = migrated
    store = SqlAnalyticsStore(url, spill_dir=tmp_path / "spill")
    store.record(_record() for _ in range(30))
    assert store.flush() == 30
    postgres_server.stop()
    try:
        store.record(_record() for _ in range(120))  # waits in the local log on disk
        assert store.flush() == 0
        assert store.status() == "down" and not store.healthy
        assert store.spill.pending_bytes() > 0
        assert store.writer.buffered == 0  # nothing held in memory
    finally:
        postgres_server.start()
    assert store.flush() == 120
    assert _count(url) == before + 150
    assert store.spill.pending_bytes() == 0 and store.healthy
    store.close()
    assert not list((tmp_path / "spill").glob("*.jsonl"))


def test_a_closed_process_log_is_shipped_by_the_next(
    postgres_server: PostgresServer, migrated: tuple[str, int], tmp_path: Path
) -> None:
    url, before = migrated
    spill = tmp_path / "spill"
    first = SqlAnalyticsStore(url, spill_dir=spill)
    postgres_server.stop()
    try:
        first.record(_record() for _ in range(40))
        first.close()  # shutdown during the outage: the rows stay in its log
        assert sum(1 for f in spill.glob("*.jsonl") for line in f.open() if line.strip()) == 40
    finally:
        postgres_server.start()
    second = SqlAnalyticsStore(url, spill_dir=spill)
    second.flush()
    second.flush()  # a second pass finds nothing left, and writes nothing twice
    assert _count(url) == before + 40
    assert second.writer.replayed == 40
    assert not list(spill.glob("*.jsonl")) and not list(spill.glob("*.lock"))
    second.close()


# A worker that logs rows, then dies by SIGKILL before its writer ships any of them.
_DYING_WORKER = """
import os, sys, uuid
from storage.analytics import PredictionRecord, SqlAnalyticsStore
store = SqlAnalyticsStore(sys.argv[1], spill_dir=sys.argv[2], flush_interval=3600, batch_size=10**9)
for i in range(int(sys.argv[3])):
    store.record([PredictionRecord(request_id=str(uuid.uuid4()), endpoint="/predict", model="m:1", label="positive",
                  score=0.9, cached=False, latency_ms=1.0, text_sha256="0" * 64, text_length=5)])
print("logged", flush=True)
os.kill(os.getpid(), 9)
"""


def test_a_sigkilled_process_log_is_shipped_by_a_survivor(migrated: tuple[str, int], tmp_path: Path) -> None:
    """Rows are on disk before they are answered: a worker killed with its rows unshipped loses
    none of them; a live worker takes its log over (its lock is free) and ships each row once."""
    url, before = migrated
    spill = tmp_path / "spill"
    survivor = SqlAnalyticsStore(url, spill_dir=spill)
    survivor.record(_record() for _ in range(5))
    run = subprocess.run([sys.executable, "-c", _DYING_WORKER, url, str(spill), "2500"], capture_output=True, text=True)
    assert run.returncode == -9 and "logged" in run.stdout, run.stderr
    assert _count(url) == before  # nothing of it was shipped
    survivor.flush()
    assert _count(url) == before + 2505
    assert survivor.writer.replayed == 2500
    survivor.close()
    assert not list(spill.glob("*.jsonl")) and not list(spill.glob("*.lock"))


def test_a_live_process_log_is_left_to_its_owner(migrated: tuple[str, int], tmp_path: Path) -> None:
    url, before = migrated
    spill = tmp_path / "spill"
    owner, other = SqlAnalyticsStore(url, spill_dir=spill), SqlAnalyticsStore(url, spill_dir=spill)
    owner.record(_record() for _ in range(7))
    other.flush()
    assert other.writer.replayed == 0 and _count(url) == before
    owner.flush()
    assert _count(url) == before + 7
    owner.close()
    other.close()


def test_a_torn_line_at_the_end_of_a_dead_log_does_not_block_the_rest(
    migrated: tuple[str, int], tmp_path: Path
) -> None:
    url, before = migrated
    spill = tmp_path / "spill"
    run = subprocess.run([sys.executable, "-c", _DYING_WORKER, url, str(spill), "3"], capture_output=True, text=True)
    assert run.returncode == -9, run.stderr
    with next(spill.glob("*.jsonl")).open("a") as f:
        f.write('{"request_id": "torn-by-a-cr')  # a crash mid-write
    survivor = SqlAnalyticsStore(url, spill_dir=spill)
    survivor.flush()
    assert _count(url) == before + 3
    assert not list(spill.glob("*.jsonl"))
    survivor.close()


def test_rows_over_the_log_cap_are_dropped_and_counted(
    postgres_server: PostgresServer, migrated: tuple[str, int], tmp_path: Path
) -> None:
    """With the database down the log grows to its cap; the rows beyond it are dropped and
    counted, never raised to the request path, and the rows within it are all shipped later."""
    url, before = migrated
    store = SqlAnalyticsStore(url, spill_dir=tmp_path / "spill", spill_max_bytes=40_000)
    postgres_server.stop()
    try:
        for _ in range(300):
            store.record([_record()])
        store.flush()
    finally:
        postgres_server.start()
    dropped = store.writer.dropped
    assert 0 < dropped < 300
    assert store.spill.pending_bytes() <= 40_000
    store.flush()
    assert _count(url) == before + 300 - dropped
    store.close()


def test_a_row_refused_as_data_goes_to_the_dead_letter_file(migrated: tuple[str, int], tmp_path: Path) -> None:
    """PostgreSQL refuses a NUL in text (a data error, not an outage): that row is set aside and
    every other row of its batch is written."""
    url, before = migrated
    store = SqlAnalyticsStore(url, spill_dir=tmp_path / "spill", store_text=True)
    rows = [_record() for _ in range(20)]
    rows[13].text = "poisoned\x00row"
    store.record(rows)
    assert store.flush() == 20
    assert _count(url) == before + 19
    assert store.healthy and store.writer.dead_letters == 1
    [line] = store.writer.dead_letter_path.read_text().splitlines()
    assert rows[13].request_id in line and "NUL" in line
    assert store.writer.dead_letter_path.stat().st_mode & 0o777 == 0o600  # users' text hashes, or texts
    store.close()


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_migrations_upgrade_downgrade_and_match_the_models(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue("database_url") if backend == "postgresql" else f"sqlite:///{tmp_path}/m.db"
    migrate.upgrade(url)
    migrate.check(url)  # raises when storage/tables.py and the migrations disagree
    migrate.downgrade(url, "base")
    engine = sa.create_engine(url)
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    migrate.upgrade(url)
    engine = sa.create_engine(url)
    assert {"predictions", "feedback", "request_errors"} <= set(sa.inspect(engine).get_table_names())
    engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_upgrade_counts_the_rows_stored_before_it(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = request.getfixturevalue("database_url") if backend == "postgresql" else f"sqlite:///{tmp_path}/m.db"
    if backend == "postgresql":
        migrate.downgrade(url, "base")  # the fixture migrated it to the newest revision
    migrate.upgrade(url, "0001")
    now = utcnow()
    records = [_record("/predict/ab", variant="AB"[i % 2]) for i in range(6)] + [_record() for _ in range(4)]
    for i, rec in enumerate(records):
        rec.created_at = now - timedelta(seconds=30 * i + 5)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.table("predictions", *[sa.column(k) for k in vars(records[0])]).insert(), [vars(r) for r in records]
        )
    engine.dispose()
    migrate.upgrade(url)
    store = SqlAnalyticsStore(url, spill_dir=tmp_path / "spill")
    summary = store.summary(timedelta(hours=1))
    assert summary["total"] == 10 and summary["by_endpoint"] == {"/predict/ab": 6, "/predict": 4}
    assert {k: v["requests"] for k, v in store.ab_report(timedelta(hours=1))["variants"].items()} == {"A": 3, "B": 3}
    store.close()


def test_concurrent_upgrades_are_serialized(database_url: str) -> None:
    """Replicas and a migration Job may start together: every upgrade succeeds, one migrates."""
    migrate.downgrade(database_url, "base")
    cmd = [sys.executable, "-m", "storage.migrate", "upgrade", "--url", database_url]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    migrate.check(database_url)
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one() == migrate.head()
    engine.dispose()


def test_sqlite_upgrade_creates_its_folder(tmp_path: Path) -> None:
    """The embedded default (sqlite:///var/analytics.db) on a first start, e.g. in the image."""
    migrate.upgrade(f"sqlite:///{tmp_path}/var/analytics.db")
    migrate.check(f"sqlite:///{tmp_path}/var/analytics.db")
    assert (tmp_path / "var" / "analytics.db").exists()


def test_a_spill_file_of_the_previous_release_is_shipped(migrated: tuple[str, int], tmp_path: Path) -> None:
    """0.1.0 named its spill files analytics-<pid>-<hex>.jsonl and wrote a blank line per append."""
    url, before = migrated
    spill = tmp_path / "spill"
    spill.mkdir()
    rows = [{**vars(_record()), "created_at": utcnow().isoformat()} for _ in range(4)]
    (spill / "analytics-4242-0badc0de.jsonl").write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))
    store = SqlAnalyticsStore(url, spill_dir=spill)
    store.flush()
    assert _count(url) == before + 4 and store.writer.replayed == 4
    assert not list(spill.glob("analytics-4242-*"))
    store.close()


def test_a_hung_redis_is_asked_once_per_backoff_not_once_per_request(redis_server: RedisServer) -> None:
    """Redis stopped with SIGSTOP accepts connections and never answers: after the first
    timeout the cache and the limiter stop asking it for their backoff, so the requests meanwhile
    are served at once (uncached, unlimited and counted) instead of each waiting for a timeout."""

    async def scenario() -> None:
        cache = RedisPredictionCache(redis_server.url, 60, backoff_s=30)
        limiter = LimitsRateLimiter(redis_server.url, socket_timeout=0.25, socket_connect_timeout=0.25)
        limiter.backoff_s = 30
        limit = parse_limit("5/minute")
        assert limit is not None
        await cache.set_many({"k": {"label": "positive"}})
        assert await cache.get_many(["k"]) == [{"label": "positive"}]
        assert redis_server.proc is not None
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            for _ in range(20):
                assert await cache.get_many(["k"]) == [None]
                await cache.set_many({"k": {"label": "negative"}})
                assert (await limiter.hit("predict", "203.0.113.7", limit)).allowed
            assert cache.errors == 1 and cache.failing  # one timeout, then no more asking
            assert limiter.errors == 1
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        assert await cache.status() == "ok"  # the watcher's probe asks regardless, and clears it
        assert not cache.failing and await cache.get_many(["k"]) == [{"label": "positive"}]

    asyncio.run(scenario())
