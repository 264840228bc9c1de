"""Time /analytics/summary and /analytics/ab queries on PostgreSQL over a seeded table.

    python -m loadtests.analytics_bench [--url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]

Without --url it starts a throwaway PostgreSQL server of its own (the local binaries, as the
tests do) and stops it at the end. Creates a scratch database beside the one in --url, migrates
it to the first revision, seeds --rows predictions (default one million) spread evenly over
--days, with feedback on 2% of the A/B rows, upgrades it to the newest revision (which counts
the seeded rows per minute, as an existing deployment's upgrade would), then runs each report
for several windows and prints the median of repeated runs. The scratch database is dropped at
the end.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import timedelta

import sqlalchemy as sa

from storage import migrate
from storage.analytics import SqlAnalyticsStore
from tests.support.servers import PostgresServer, scratch_database

SEED = """
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
FEEDBACK = """
INSERT INTO feedback (request_id, label, created_at)
SELECT request_id, CASE WHEN random() < 0.9 THEN label ELSE 'negative' END, created_at
FROM predictions WHERE variant IS NOT NULL AND random() < 0.02
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a PostgreSQL server to use (default: a throwaway one)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database (for EXPLAIN)")
    args = parser.parse_args()
    if args.url is not None:
        return bench(args, args.url)
    print("starting a throwaway PostgreSQL server ...", flush=True)
    with PostgresServer() as server:
        return bench(args, server.url)


def bench(args: argparse.Namespace, server_url: str) -> int:
    with scratch_database(server_url, "sentiment_bench_", keep=args.keep) as url:
        name = sa.make_url(url).database
        migrate.upgrade(url, "0001")
        engine = sa.create_engine(url)
        started = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(sa.text(SEED), {"rows": args.rows, "days": args.days, "salt": name})
            conn.execute(sa.text(FEEDBACK))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE predictions")
            conn.exec_driver_sql("VACUUM ANALYZE feedback")
        print(f"seeded {args.rows:,} rows over {args.days:g} days in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        migrate.upgrade(url)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE prediction_counts")
        print(f"upgraded to the newest schema in {time.perf_counter() - started:.1f} s")
        engine.dispose()

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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
