"""Time /analytics/summary and /analytics/ab queries over a seeded table, on PostgreSQL and on
the embedded default's SQLite.

    python -m loadtests.analytics_bench [--stores postgresql,sqlite] [--url postgresql+psycopg://...]

PostgreSQL: without --url it starts a throwaway server of its own (the local binaries, as the
tests do) and stops it at the end; a scratch database is made beside the one in --url and
dropped at the end. SQLite: a scratch file in a temporary folder, removed at the end.

Each store is migrated to the first revision, seeded with --rows predictions (default one
million) spread evenly over --days in the order they would have been written, with feedback on
2% of the A/B rows, and upgraded to the newest revision (which counts the seeded rows per
minute, as an existing deployment's upgrade would). Then each report runs for several windows;
the table gives the median and the slowest of repeated runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

from storage import migrate
from storage.analytics import SqlAnalyticsStore
from tests.support.servers import PostgresServer, scratch_database

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", default=",".join(STORES), help="comma-separated: postgresql, sqlite")
    parser.add_argument("--url", default=None, help="a PostgreSQL server to use (default: a throwaway one)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database or file (for EXPLAIN)")
    args = parser.parse_args()
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    unknown = sorted(set(stores) - set(STORES))
    if unknown:
        parser.error(f"unknown store(s) {', '.join(unknown)}: choose from {', '.join(STORES)}")
    for store in stores:
        print(f"== {store}", flush=True)
        if store == "sqlite":
            folder = Path(tempfile.mkdtemp(prefix="sentiment-bench-"))
            bench(args, f"sqlite:///{folder / 'analytics.db'}")
            if args.keep:
                print(f"kept {folder / 'analytics.db'}")
            else:
                for path in folder.iterdir():
                    path.unlink()
                folder.rmdir()
        elif args.url is not None:
            with scratch_database(args.url, "sentiment_bench_", keep=args.keep) as url:
                bench(args, url)
        else:
            print("starting a throwaway PostgreSQL server ...", flush=True)
            with PostgresServer() as server, scratch_database(server.url, "sentiment_bench_") as url:
                bench(args, url)
    return 0


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


if __name__ == "__main__":
    raise SystemExit(main())
