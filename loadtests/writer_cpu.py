"""The analytics writer's CPU per prediction row on PostgreSQL: `python -m loadtests.writer_cpu
[--url postgresql+psycopg://postgres@127.0.0.1:5432/postgres] [--rows 5000] [--rounds 3]`
(docs/performance.md, "The analytics writer").

The writer runs in a thread of each API worker, so its CPU is the worker's, and while it runs
Python it holds the GIL the event loop waits for. In a scratch database (beside the one in --url,
or on a throwaway server without it) each round inserts --rows new rows in batches of 500, as
the writer ships them, two ways: SQLAlchemy's multi-row `INSERT ... ON CONFLICT DO NOTHING
RETURNING` and the writer's one-row statement sent by psycopg's executemany in pipeline mode
(storage/analytics/writer.py, `insert_new_rows`); then it times the whole writer
(`AnalyticsWriter.flush`: reading the local log, the insert and the per-minute counts) over
--rows rows recorded one per request. Prints the thread's CPU and the wall time per row,
medians over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable

import sqlalchemy as sa

from storage import migrate
from storage.analytics import PredictionRecord, SqlAnalyticsStore, utcnow
from storage.analytics.writer import insert_new_rows, upsert
from storage.tables import predictions
from tests.support.servers import PostgresServer, scratch_database

BATCH = 500


def rows(n: int) -> list[dict]:
    return [
        {
            "request_id": str(uuid.uuid4()),
            "created_at": utcnow(),
            "endpoint": "/predict",
            "model": "sentiment-minilm-int8:bench",
            "variant": None,
            "label": "positive",
            "score": 0.93,
            "cached": i % 3 == 0,
            "latency_ms": 4.2,
            "text_sha256": "0" * 64,
            "text_length": 48,
            "text": None,
        }
        for i in range(n)
    ]


def timed(run: Callable[[], object], n: int) -> tuple[float, float]:
    """CPU and wall microseconds per row of `run` over n rows."""
    cpu, wall = time.thread_time(), time.perf_counter()
    run()
    return (time.thread_time() - cpu) * 1e6 / n, (time.perf_counter() - wall) * 1e6 / n


def bench(url: str, n: int, rounds: int) -> None:
    engine = sa.create_engine(url)
    stmt = (
        upsert(engine, predictions)
        .on_conflict_do_nothing(index_elements=[predictions.c.request_id])
        .returning(predictions.c.request_id)
    )

    def insert_many(batch: list[dict]) -> None:
        with engine.begin() as conn:
            assert len(set(conn.execute(stmt, batch).scalars())) == len(batch)

    def pipeline(batch: list[dict]) -> None:
        with engine.begin() as conn:
            assert len(insert_new_rows(conn, batch)) == len(batch)

    def batches(run: Callable[[list[dict]], None]) -> Callable[[], None]:
        data = rows(n)

        def all_batches() -> None:
            for i in range(0, n, BATCH):
                run(data[i : i + BATCH])

        return all_batches

    results: dict[str, list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for name, run in (("multi-row INSERT (SQLAlchemy)", insert_many), ("executemany, pipeline mode", pipeline)):
            results.setdefault(name, []).append(timed(batches(run), n))
        with tempfile.TemporaryDirectory() as spill:
            store = SqlAnalyticsStore(url, spill_dir=spill)
            for row in rows(n):
                store.record([PredictionRecord(**row)])
            results.setdefault("the writer's flush (log, insert, counts)", []).append(timed(store.flush, n))
            store.close()
    engine.dispose()
    print(f"{n} rows per round in batches of {BATCH}, {rounds} rounds, medians (microseconds per row)")
    print(f"{'path':<40} {'CPU':>8} {'wall':>8}")
    for name, runs in results.items():
        cpu, wall = (statistics.median(column) for column in zip(*runs, strict=True))
        print(f"{name:<40} {cpu:8.1f} {wall:8.1f}")


def scratch(server_url: str, n: int, rounds: int) -> None:
    with scratch_database(server_url, "sentiment_writer_") as url:
        migrate.upgrade(url)
        bench(url, n, rounds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a PostgreSQL server to use (default: a throwaway one)")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.url is not None:
        scratch(args.url, args.rows, args.rounds)
        return
    print("starting a throwaway PostgreSQL server ...", flush=True)
    with PostgresServer() as server:
        scratch(server.url, args.rows, args.rounds)


if __name__ == "__main__":
    main()
