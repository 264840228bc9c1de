"""`make bench-analytics`: the analytics store's query times over a seeded table, and its log's cap
under a long database outage.

    python -m loadtests.analytics [queries] [--stores postgresql,sqlite] [--url postgresql+psycopg://...]
    python -m loadtests.analytics spill-cap [--outage-seconds 600] [--rate 200] [--models store|quick]

`queries` (the default): /analytics/summary and /analytics/ab queries on PostgreSQL and on the
embedded default's SQLite. PostgreSQL: without --url it starts a throwaway server of its own (the
local binaries, as the tests do) and stops it at the end; a scratch database is made beside the
one in --url and dropped at the end. SQLite: a scratch file in a temporary folder, removed at the
end. Each store is migrated to the first revision, seeded with --rows predictions (default one
million) spread evenly over --days in the order they would have been written, with feedback on
2% of the A/B rows, and upgraded to the newest revision (which counts the seeded rows per
minute, as an existing deployment's upgrade would). Then each report runs for several windows;
the table gives the median and the slowest of repeated runs.

`spill-cap`:
1. A throwaway PostgreSQL, a 2-worker `bentoml serve` on it with a small SPILL_MAX_BYTES (no
   Redis: the embedded cache), and Prometheus with the committed alert rules scraping it.
2. /predict at a steady rate (a few texts, so answers come from the cache and the rows, not the
   model, are what is measured); PostgreSQL stopped for the outage, then started again.
3. Every answered request id against the rows stored once the logs are shipped: each answered
   row is either stored or counted in sentiment_analytics_rows_total{outcome="dropped"}, the
   workers are the same processes as before the outage, and SentimentAnalyticsRowsDropped fired.
4. Replay: a dead worker's log of --replay-rows rows is shipped by a fresh store in this
   process while a thread samples its resident memory (it must stay flat: the log is streamed).
It writes summary.json and report.md to var/spill-cap/<time>/ (--out to change) and exits 1 when
a row is unaccounted for, a worker was replaced, the alert did not fire or the replay fell short.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psutil
import sqlalchemy as sa

from loadtests.harness import metric_totals
from loadtests.report.markdown import table
from storage import migrate
from storage.analytics import SqlAnalyticsStore
from tests.support.prometheus import Prometheus
from tests.support.servers import PostgresServer, scratch_database
from tests.support.serving import ROOT, Served, free_port

PG_SEED = """
INSERT INTO predictions (request_id, created_at, endpoint, model, variant, label, score, cached,
                         latency_ms, text_sha256, text_length)
SELECT md5(i::text || :salt)::uuid::text,
       now() - (i::float8 / :rows) * (:days * interval '1 day'),
       (ARRAY['/predict', '/predict', '/predict', '/predict', '/predict', '/predict', '/predict',
              '/predict/ab', '/predict/ab', '/batch'])[1 + i % 10],
       CASE WHEN i % 10 IN (7, 8) AND i % 20 < 10 THEN 'sentiment-minilm-int8:v1' ELSE 'sentiment-minilm:v1' END,
       CASE WHEN i % 10 IN (7, 8) THEN (ARRAY['A', 'B'])[1 + (i / 10) % 2] END,
       CASE WHEN random() < 0.55 THEN 'positive' ELSE 'negative' END,
       0.5 + random() / 2,
       random() < 0.7,
       5 + random() * 120,
       md5(i::text),
       10 + (i % 400)
FROM generate_series(1, :rows) AS s(i)
"""
PG_FEEDBACK = """
INSERT INTO feedback (request_id, label, created_at)
SELECT request_id, CASE WHEN random() < 0.9 THEN label ELSE 'negative' END, created_at
FROM predictions WHERE variant IS NOT NULL AND random() < 0.02
"""


# The same rows on SQLite, oldest first (rowids follow time, as the service writes them), with
# created_at in SQLAlchemy's text format for SQLite.
SQLITE_SEED = """
WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < :rows)
INSERT INTO predictions (request_id, created_at, endpoint, model, variant, label, score, cached,
                         latency_ms, text_sha256, text_length)
SELECT lower(hex(randomblob(16))),
       strftime('%Y-%m-%d %H:%M:%f', 'now', printf('-%.3f seconds', (:rows - i) * :days * 86400.0 / :rows)) || '000',
       CASE i % 10 WHEN 7 THEN '/predict/ab' WHEN 8 THEN '/predict/ab' WHEN 9 THEN '/batch' ELSE '/predict' END,
       CASE WHEN i % 10 IN (7, 8) AND i % 20 < 10 THEN 'sentiment-minilm-int8:v1' ELSE 'sentiment-minilm:v1' END,
       CASE WHEN i % 10 IN (7, 8) THEN CASE (i / 10) % 2 WHEN 0 THEN 'A' ELSE 'B' END END,
       CASE WHEN abs(random()) % 100 < 55 THEN 'positive' ELSE 'negative' END,
       0.5 + (abs(random()) % 1000000) / 2000000.0,
       abs(random()) % 10 < 7,
       5 + (abs(random()) % 1000000) * 120 / 1000000.0,
       lower(hex(randomblob(32))),
       10 + (i % 400)
FROM s
"""
SQLITE_FEEDBACK = """
INSERT INTO feedback (request_id, label, created_at)
SELECT request_id, CASE WHEN abs(random()) % 10 < 9 THEN label ELSE 'negative' END, created_at
FROM predictions WHERE variant IS NOT NULL AND abs(random()) % 100 < 2
"""
STORES = ("postgresql", "sqlite")


def seed(url: str, rows: int, days: float) -> None:
    """`rows` predictions over the last `days` at the first revision, then the upgrade to the
    newest (which counts them), each timed."""
    migrate.upgrade(url, "0001")
    engine = sa.create_engine(url)
    sqlite = engine.dialect.name == "sqlite"
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(sa.text(SQLITE_SEED if sqlite else PG_SEED), {"rows": rows, "days": days, "salt": url})
        conn.execute(sa.text(SQLITE_FEEDBACK if sqlite else PG_FEEDBACK))
    analyze = ["ANALYZE"] if sqlite else ["VACUUM ANALYZE predictions", "VACUUM ANALYZE feedback"]
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for statement in analyze:
            conn.exec_driver_sql(statement)
    print(f"seeded {rows:,} rows over {days:g} days in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    migrate.upgrade(url)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE" if sqlite else "VACUUM ANALYZE prediction_counts")
    print(f"upgraded to the newest schema in {time.perf_counter() - started:.1f} s")
    engine.dispose()


def bench(args: argparse.Namespace, url: str) -> None:
    seed(url, args.rows, args.days)
    store = SqlAnalyticsStore(url)
    header = f"{'report':<10} {'window':>7} {'rows in window':>15} {'percentiles from':>17}"
    print(f"{header} {'median ms':>10} {'max ms':>8}")
    for window in ("15m", "1h", "24h", "7d", "30d"):
        delta = timedelta(seconds=int(window[:-1]) * {"m": 60, "h": 3600, "d": 86400}[window[-1]])
        for report, run in (("summary", store.summary), ("ab", store.ab_report)):
            run(delta)  # warm the cache and the plan
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                result = run(delta)
                times.append((time.perf_counter() - t) * 1000)
            if report == "summary":
                rows, sampled = result["total"], result["latency_rows"]
            else:
                rows = sum(v["requests"] for v in result["variants"].values())
                sampled = sum(v["latency_rows"] for v in result["variants"].values())
            print(
                f"{report:<10} {window:>7} {rows:>15,} {sampled:>17,} "
                f"{statistics.median(times):>10.1f} {max(times):>8.1f}"
            )
    store.close()


def queries(args: argparse.Namespace, stores: list[str]) -> int:
    """Each store seeded, then its reports timed (bench)."""
    for store in stores:
        print(f"== {store}", flush=True)
        if store == "sqlite":
            folder = Path(tempfile.mkdtemp(prefix="sentiment-bench-"))
            bench(args, f"sqlite:///{folder / 'analytics.db'}")
            if args.keep:
                print(f"kept {folder / 'analytics.db'}")
            else:
                shutil.rmtree(folder)
        elif args.url is not None:
            with scratch_database(args.url, "sentiment_bench_", keep=args.keep) as url:
                bench(args, url)
        else:
            print("starting a throwaway PostgreSQL server ...", flush=True)
            with PostgresServer() as server, scratch_database(server.url, "sentiment_bench_") as url:
                bench(args, url)
    return 0


# --- the log's cap -----------------------------------------------------------------------

ALERT = "SentimentAnalyticsRowsDropped"
TEXTS = [f"Steady review number {i}: the service answered {'well' if i % 2 else 'badly'}." for i in range(40)]
DYING_WRITER = """
import os, sys, uuid
from storage.analytics import PredictionRecord, SqlAnalyticsStore
store = SqlAnalyticsStore(sys.argv[1], spill_dir=sys.argv[2], flush_interval=3600, batch_size=10**9)
rows = [PredictionRecord(request_id=str(uuid.uuid4()), endpoint="/predict", model="m:1", label="positive",
        score=0.9, cached=False, latency_ms=1.0, text_sha256="0" * 64, text_length=5) for _ in range(1000)]
for _ in range(int(sys.argv[3]) // 1000):
    for r in rows:
        r.request_id = str(uuid.uuid4())
    store.record(rows)
os.kill(os.getpid(), 9)
"""


def _metric(url: str, name: str, **labels: str) -> float:
    return metric_totals(url, [name], labels=labels)[name]


async def _drive(url: str, rate: float, stop: threading.Event, answered: list[str], errors: list[str]) -> None:
    """Open loop: a request every 1/rate s, whatever the answers' times."""
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=64)) as client:

        async def one(n: int) -> None:
            try:
                r = await client.post("/predict", json={"text": TEXTS[n % len(TEXTS)]})
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)
                return
            if r.status_code == 200:
                answered.append(r.json()["request_id"])
            else:
                errors.append(str(r.status_code))

        tasks: set[asyncio.Task[None]] = set()
        start, n = time.monotonic(), 0
        while not stop.is_set():
            n += 1
            task = asyncio.create_task(one(n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        await asyncio.gather(*tasks)


def _stored(url: str, ids: list[str]) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        conn.exec_driver_sql("CREATE TEMP TABLE answered (request_id text PRIMARY KEY)")
        for i in range(0, len(ids), 10_000):
            conn.execute(sa.text("INSERT INTO answered VALUES (:r)"), [{"r": r} for r in ids[i : i + 10_000]])
        n = conn.exec_driver_sql("SELECT count(*) FROM predictions JOIN answered USING (request_id)").scalar_one()
    engine.dispose()
    return int(n)


def _replay_memory(url: str, folder: Path, rows: int) -> dict:
    """Ship a SIGKILLed writer's log of `rows` rows here, sampling this process's RSS."""
    run = subprocess.run([sys.executable, "-c", DYING_WRITER, url, str(folder), str(rows)], cwd=ROOT, check=False)
    assert run.returncode == -9, run.returncode
    size = sum(p.stat().st_size for p in folder.glob("*.jsonl"))
    me = psutil.Process()
    store = SqlAnalyticsStore(url, spill_dir=folder)
    before = me.memory_info().rss
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(me.memory_info().rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    store.flush()
    seconds = time.monotonic() - started
    done.set()
    sampler.join()
    replayed = store.writer.replayed
    store.close()
    mb = 2**20
    return {
        "rows": rows,
        "replayed": replayed,
        "log_mb": round(size / mb, 1),
        "seconds": round(seconds, 1),
        "rss_before_mb": round(before / mb, 1),
        "rss_peak_mb": round(max(samples, default=before) / mb, 1),
        "rss_growth_mb": round((max(samples, default=before) - before) / mb, 1),
    }


def spill_cap(args: argparse.Namespace) -> int:
    """The outage under a steady load, the tally, the alert and the replay (the module's doc)."""
    out = args.out or ROOT / "var" / "spill-cap" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    env = {"RATE_LIMIT_PREDICT": "0", "SPILL_MAX_BYTES": str(args.cap_bytes), "SPILL_DIR": str(out / "spill")}
    if args.models == "quick":  # built into a store of its own, never the user's
        home = ROOT / "var" / "bentoml-quick"
        env["BENTOML_HOME"] = os.environ["BENTOML_HOME"] = str(home)
        from models.build import build

        fp32, int8 = build("quick", ROOT / "var" / "data")
        env.update(SENTIMENT_MODEL=int8, AB_MODEL_B=fp32)
    summary: dict = {"rate": args.rate, "outage_seconds": args.outage_seconds, "cap_bytes": args.cap_bytes}
    with PostgresServer() as postgres:
        migrate.upgrade(postgres.url)
        env["DATABASE_URL"] = postgres.url
        with Served(env, out / "serve.log", workers=2) as served:
            workers_before = sorted(p.pid for p in psutil.Process(served.proc.pid).children(recursive=True))  # type: ignore[union-attr]
            with Prometheus([f"127.0.0.1:{served.port}"], out / "prometheus", free_port(), "2s") as prometheus:
                answered: list[str] = []
                errors: list[str] = []
                stop = threading.Event()
                load = threading.Thread(
                    target=asyncio.run, args=(_drive(served.url, args.rate, stop, answered, errors),)
                )
                load.start()
                fired_at = None
                down = False
                try:
                    time.sleep(10)
                    print(f"PostgreSQL stopped for {args.outage_seconds:.0f} s at {args.rate:.0f} req/s", flush=True)
                    postgres.stop()
                    down = True
                    outage_start = time.monotonic()
                    while time.monotonic() - outage_start < args.outage_seconds:
                        time.sleep(5)
                        firing = prometheus.query(
                            'ALERTS{alertname="SentimentAnalyticsRowsDropped",alertstate="firing"}'
                        )
                        if firing and fired_at is None:
                            fired_at = round(time.monotonic() - outage_start, 1)
                            print(f"SentimentAnalyticsRowsDropped firing after {fired_at} s of outage", flush=True)
                    postgres.start()
                    down = False
                    time.sleep(20)
                finally:
                    stop.set()
                    load.join()
                    if down:
                        postgres.start()
                deadline = time.monotonic() + 120
                while _metric(served.url, "sentiment_analytics_spill_bytes") > 0 and time.monotonic() < deadline:
                    time.sleep(2)
                dropped = int(_metric(served.url, "sentiment_analytics_rows_total", outcome="dropped"))
                workers_after = sorted(p.pid for p in psutil.Process(served.proc.pid).children(recursive=True))  # type: ignore[union-attr]
        stored = _stored(postgres.url, answered)
        summary |= {
            "answered": len(answered),
            "stored": stored,
            "dropped_counter": dropped,
            "unaccounted": len(answered) - stored - dropped,
            "errors": len(errors),
            "same_workers": workers_before == workers_after,
            "alert_fired_after_s": fired_at,
        }
        print(json.dumps(summary, indent=2), flush=True)
        summary["replay"] = _replay_memory(postgres.url, out / "replay", args.replay_rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    replay = summary["replay"]
    header = ("answered", "stored", "dropped (counter)", "unaccounted", "errors", "same workers", "alert fired after")
    row = (f"{len(answered):,}", f"{stored:,}", f"{dropped:,}", summary["unaccounted"], len(errors))
    tally = table(header, [(*row, summary["same_workers"], f"{fired_at} s")])
    (out / "report.md").write_text(
        f"# Analytics log cap: {args.outage_seconds:.0f} s outage at {args.rate:.0f} req/s,"
        f" cap {args.cap_bytes:,} bytes\n\n" + "\n".join(tally) + "\n\n"
        f"Replay of a dead worker's log: {replay['rows']:,} rows ({replay['log_mb']} MB) in {replay['seconds']} s;"
        f" resident memory {replay['rss_before_mb']} MB before, peak {replay['rss_peak_mb']} MB"
        f" (+{replay['rss_growth_mb']} MB).\n"
    )
    print(f"report: {out / 'report.md'}")
    ok = (
        summary["unaccounted"] == 0
        and summary["same_workers"]
        and fired_at is not None
        and replay["replayed"] == replay["rows"]
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    q = commands.add_parser("queries", help="the reports' query times over a seeded table (the default)")
    q.add_argument("--stores", default=",".join(STORES), help="comma-separated: postgresql, sqlite")
    q.add_argument("--url", default=None, help="a PostgreSQL server to use (default: a throwaway one)")
    q.add_argument("--rows", type=int, default=1_000_000)
    q.add_argument("--days", type=float, default=30)
    q.add_argument("--repeats", type=int, default=7)
    q.add_argument("--keep", action="store_true", help="keep the scratch database or file (for EXPLAIN)")
    s = commands.add_parser("spill-cap", help="the analytics log's cap under a long database outage")
    s.add_argument("--outage-seconds", type=float, default=600)
    s.add_argument("--rate", type=float, default=200, help="requests per second")
    s.add_argument("--cap-bytes", type=int, default=2_000_000, help="SPILL_MAX_BYTES of the instance")
    s.add_argument("--replay-rows", type=int, default=500_000)
    s.add_argument("--models", choices=["store", "quick"], default="store", help="the user's store, or quick ones")
    s.add_argument("--out", type=Path, default=None)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("queries", "spill-cap", "-h", "--help"):
        argv = ["queries", *argv]  # `make bench-analytics`'s options are the queries'
    args = parser.parse_args(argv)
    if args.command == "spill-cap":
        return spill_cap(args)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if unknown := sorted(set(stores) - set(STORES)):
        parser.error(f"unknown store(s) {', '.join(unknown)}: choose from {', '.join(STORES)}")
    return queries(args, stores)


if __name__ == "__main__":
    raise SystemExit(main())
