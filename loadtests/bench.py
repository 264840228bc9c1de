"""`make bench` (`python -m loadtests.bench`): raw model throughput, then HTTP load on a real
`bentoml serve`, in one run.

Cases: unique texts (every request a cache miss) and repeated texts (cache hits), each at 1, 16
and 64 concurrent closed-loop Locust users. Rate limits are switched off for the served
instance, since the point is the serving path's capacity, not the per-client policy.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtests.serving import Served

ROOT = Path(__file__).resolve().parents[1]
CASES = [("unique", 1), ("unique", 16), ("unique", 64), ("repeated", 1), ("repeated", 16), ("repeated", 64)]


def raw_throughput(tag: str, texts: list[str], seconds: float, threads: int) -> dict[str, float]:
    """Texts per second of batch-32 forward passes in a loop, no HTTP, all cores."""
    from models import runtime

    predictor = runtime.load(tag, threads)
    predictor.predict(texts[:32])
    done, times = 0, []
    started = time.perf_counter()
    i = 0
    while time.perf_counter() - started < seconds:
        batch = [texts[(i * 32 + j) % len(texts)] for j in range(32)]
        t = time.perf_counter()
        predictor.predict(batch)
        times.append(time.perf_counter() - t)
        done += 32
        i += 1
    elapsed = time.perf_counter() - started
    return {
        "texts_per_s": round(done / elapsed, 1),
        "batch32_ms_median": round(statistics.median(times) * 1000, 1),
    }


def batch_histogram(url: str) -> tuple[float, float]:
    """(sum, count) of the adaptive batch sizes of the infer API, over all workers."""
    total = count = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if 'method_name="infer"' not in line:
            continue
        if line.startswith("bentoml_service_adaptive_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("bentoml_service_adaptive_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def run_locust(url: str, mode: str, users: int, seconds: int, workdir: Path) -> dict:
    prefix = workdir / f"{mode}-{users}"
    cmd = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "bench_locustfile.py"),
        "--headless", "--only-summary", "-u", str(users), "-r", str(users), "-t", f"{seconds}s",
        "--host", url, "--csv", str(prefix), "--loglevel", "WARNING",
    ]  # fmt: skip
    env = {**os.environ, "BENCH_MODE": mode}
    subprocess.run(cmd, cwd=ROOT, env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(f"{prefix}_stats.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    return {
        "requests": int(row["Request Count"]),
        "failures": int(row["Failure Count"]),
        "req_per_s": round(float(row["Requests/s"]), 1),
        "p50_ms": float(row["50%"]),
        "p95_ms": float(row["95%"]),
        "p99_ms": float(row["99%"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="sentiment-minilm:latest")
    parser.add_argument("--seconds", type=int, default=30, help="duration of each HTTP case")
    parser.add_argument("--raw-seconds", type=float, default=20)
    parser.add_argument("--workers", type=int, default=None, help="SERVICE_WORKERS for the served instance")
    parser.add_argument("--json", type=Path, default=Path("var/bench.json"))
    args = parser.parse_args()

    from loadtests.bench_locustfile import TEXTS

    print(f"raw model throughput ({args.model}, batch 32, {os.cpu_count()} threads, {args.raw_seconds:.0f} s)...")
    raw = raw_throughput(args.model, TEXTS, args.raw_seconds, os.cpu_count() or 1)
    print(f"  {raw['texts_per_s']} texts/s, batch of 32 in {raw['batch32_ms_median']} ms (median)")

    workdir = Path(tempfile.mkdtemp(prefix="sentiment-bench-"))
    env = {
        "SENTIMENT_MODEL": args.model,
        "RATE_LIMIT_PREDICT": "0",
        "RATE_LIMIT_BATCH": "0",
        "DATABASE_URL": f"sqlite:///{workdir / 'analytics.db'}",
        "SPILL_DIR": str(workdir / "spill"),
    }
    try:
        server = Served(env, workdir / "serve.log", workers=args.workers).start(timeout=180)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    url = server.url
    results = []
    try:
        health = httpx.get(f"{url}/health", timeout=10).json()
        print(f"serving {health['model']['A']} on {url}, {health['model']['threads']} torch thread(s) per worker")
        for mode, users in CASES:
            before = batch_histogram(url)
            stats = run_locust(url, mode, users, args.seconds, workdir)
            after = batch_histogram(url)
            batches = after[1] - before[1]
            stats["mean_batch"] = round((after[0] - before[0]) / batches, 1) if batches else None
            stats.update(mode=mode, users=users)
            results.append(stats)
            print(f"  {mode:>8} x{users:<3} {stats['req_per_s']:>7} req/s  p50 {stats['p50_ms']:>5.0f}  "
                  f"p95 {stats['p95_ms']:>5.0f}  p99 {stats['p99_ms']:>5.0f} ms  "
                  f"errors {stats['failures']}  mean batch {stats['mean_batch']}", flush=True)  # fmt: skip
    finally:
        server.stop()

    print()
    print(f"{'texts':<9} {'clients':>7} {'req/s':>8} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'errors':>6} "
          f"{'batch':>6} {'% of raw':>8}")  # fmt: skip
    for r in results:
        share = r["req_per_s"] / raw["texts_per_s"] * 100
        print(f"{r['mode']:<9} {r['users']:>7} {r['req_per_s']:>8.1f} {r['p50_ms']:>7.0f} {r['p95_ms']:>7.0f} "
              f"{r['p99_ms']:>7.0f} {r['failures']:>6} {r['mean_batch'] or '-':>6} {share:>7.0f}%")  # fmt: skip
    print(f"raw model: {raw['texts_per_s']} texts/s at batch 32 (no HTTP, same run)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"raw": raw, "cases": results, "model": args.model}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
