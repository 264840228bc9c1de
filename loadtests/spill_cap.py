"""The analytics log's cap under a long database outage, and its replay's memory.

    python -m loadtests.spill_cap                       # 10-minute outage at 200 req/s, 2 MB cap
    python -m loadtests.spill_cap --outage-seconds 60   # a shorter one

1. A throwaway PostgreSQL, a 2-worker `bentoml serve` on it with a small SPILL_MAX_BYTES (no
   Redis: the embedded cache), and Prometheus with the committed alert rules scraping it.
2. /predict at a steady rate (a few texts, so answers come from the cache and the rows, not the
   model, are what is measured); PostgreSQL stopped for the outage, then started again.
3. Every answered request id against the rows stored once the logs are shipped: each answered
   row is either stored or counted in sentiment_analytics_rows_total{outcome="dropped"}, the
   workers are the same processes as before the outage, and SentimentAnalyticsRowsDropped fired.
4. Replay: a dead worker's log of --replay-rows rows is shipped by a fresh store in this
   process while a thread samples its resident memory (it must stay flat: the log is streamed).

Writes summary.json and report.md to var/spill-cap/<time>/ (--out to change).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
import sqlalchemy as sa

from storage import migrate
from storage.analytics import SqlAnalyticsStore
from tests.support.prometheus import Prometheus
from tests.support.servers import PostgresServer
from tests.support.serving import ROOT, Served, free_port

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
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outage-seconds", type=float, default=600)
    parser.add_argument("--rate", type=float, default=200, help="requests per second")
    parser.add_argument("--cap-bytes", type=int, default=2_000_000, help="SPILL_MAX_BYTES of the instance")
    parser.add_argument("--replay-rows", type=int, default=500_000)
    parser.add_argument("--models", choices=["store", "quick"], default="store", help="the user's store, or quick ones")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
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
    (out / "report.md").write_text(
        f"# Analytics log cap: {args.outage_seconds:.0f} s outage at {args.rate:.0f} req/s,"
        f" cap {args.cap_bytes:,} bytes\n\n"
        f"| answered | stored | dropped (counter) | unaccounted | errors | same workers | alert fired after |\n"
        f"|---|---|---|---|---|---|---|\n"
        f"| {len(answered):,} | {stored:,} | {dropped:,} | {summary['unaccounted']} | {len(errors)} |"
        f" {summary['same_workers']} | {fired_at} s |\n\n"
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


if __name__ == "__main__":
    raise SystemExit(main())
