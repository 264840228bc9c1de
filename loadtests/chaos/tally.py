"""The chaos run's figures: Locust's records against the analytics table.

Answered ids (from 200 bodies) are compared with `SELECT request_id FROM predictions`: missing
(answered, not stored), duplicated (answered twice, or stored twice), extra (stored, never
answered: in flight when a worker died or a connection broke). Statuses are counted with a 503
that carries `Retry-After` apart (a shed) and connection errors by type; latencies are of
answered requests, overall, per fault window and outside every window, and per second.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from loadtests.chaos.faults import Window

SHED = "503 shed"  # with Retry-After
CONNECTION = "connection error"


def read_records(folder: Path) -> list[dict[str, Any]]:
    """Every Locust process's records (records-*.jsonl), sorted by the time each was sent."""
    rows = []
    for path in sorted(folder.glob("records-*.jsonl")):
        with path.open(encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return sorted(rows, key=lambda r: r["t"])


def outcome(row: dict[str, Any]) -> str:
    # no response, or one cut off after its status line (a 200 whose body never arrived whole)
    if row["status"] == 0 or row.get("error"):
        return CONNECTION
    if row["status"] == 503 and row.get("retry_after"):
        return SHED
    return str(row["status"])


def answered(row: dict[str, Any]) -> bool:
    return outcome(row) == "200"


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest rank, as the load tests' reports compute it."""
    s = sorted(values)
    if not s:
        return None
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


# --- the database ------------------------------------------------------------------------


def row_count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM predictions")).scalar_one())


def stored_ids(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT request_id FROM predictions")).scalars())


def _waiting_rows(metrics_url: str) -> float | None:
    """Rows the workers hold in memory plus spill bytes, from /metrics; None when unreachable."""
    try:
        text = httpx.get(metrics_url, timeout=5).text
    except httpx.HTTPError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("sentiment_analytics_buffered_rows", "sentiment_analytics_spill_bytes")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_drained(
    engine: sa.Engine, metrics_url: str, timeout: float, steady_s: float = 5, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Poll the row count until it has not grown for `steady_s` seconds while /metrics shows
    nothing buffered or spilled, or `timeout` passes. Returns what was seen."""
    started = time.monotonic()
    last, since = -1, started
    while True:
        try:
            count = row_count(engine)
        except sa.exc.SQLAlchemyError:
            count = -1
        now = time.monotonic()
        if count != last:
            last, since = count, now
        waiting = _waiting_rows(metrics_url)
        if count >= 0 and now - since >= steady_s and not waiting:
            return {"rows": count, "seconds": round(now - started, 1), "drained": True}
        if now - started > timeout:
            log(f"analytics not drained in {timeout:.0f} s: {count} rows, {waiting} buffered rows + spill bytes")
            return {"rows": count, "seconds": round(now - started, 1), "drained": False, "waiting": waiting}
        time.sleep(1)


# --- the figures -------------------------------------------------------------------------


def _latency(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ms = [r["ms"] for r in rows if answered(r)]
    return {
        "requests": len(rows),
        "answered": len(ms),
        "p50_ms": percentile(ms, 0.5),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": max(ms, default=None),
        "outcomes": dict(Counter(outcome(r) for r in rows)),
    }


def per_second(rows: list[dict[str, Any]], t0: float) -> list[dict[str, Any]]:
    """Per second of the run, by when each request was sent: answered, shed, failed, answered p99."""
    if not rows:
        return []
    buckets: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        buckets.setdefault(int(r["t"] - t0), []).append(r)
    series = []
    for second in range(min(buckets), max(buckets) + 1):
        got = buckets.get(second, [])
        kinds = Counter(outcome(r) for r in got)
        series.append(
            {
                "t": second,
                "answered": kinds["200"],
                "shed": kinds[SHED],
                "failed": sum(n for k, n in kinds.items() if k not in ("200", SHED)),
                "p99_ms": percentile((r["ms"] for r in got if answered(r)), 0.99),
            }
        )
    return series


def tally(rows: list[dict[str, Any]], stored: list[str], windows: list[Window], t0: float) -> dict[str, Any]:
    ids = [i for r in rows if answered(r) for i in (r.get("ids") or [])]
    answered_at = {i: r["t"] + r["ms"] / 1000 for r in rows if answered(r) for i in (r.get("ids") or [])}
    answered_set, stored_set = set(ids), set(stored)
    missing = sorted(answered_set - stored_set, key=lambda i: answered_at[i])
    statuses = Counter(outcome(r) for r in rows)
    errors = Counter(r.get("error", "?") for r in rows if outcome(r) == CONNECTION)
    server_errors = {k: n for k, n in statuses.items() if k.isdigit() and int(k) >= 500}

    def window_of(t: float) -> str:
        # a row is lost when its worker dies or its writer fails: charged to a window that
        # was on when (or within 2 s after) the answer went out
        for w in windows:
            if w.start - 2 <= t <= w.end + 2:
                return w.name
        return "outside the faults"

    inside = [r for r in rows if any(w.start <= r["t"] <= w.end for w in windows)]
    outside = [r for r in rows if not any(w.start <= r["t"] <= w.end for w in windows)]
    return {
        "requests": len(rows),
        "statuses": dict(sorted(statuses.items())),
        "connection_errors": dict(errors),
        "server_errors": server_errors,  # 5xx other than a shed (a 503 without Retry-After counts)
        "answers_without_ids": sum(1 for r in rows if answered(r) and not r.get("ids")),
        "predictions_answered": len(ids),
        "rows_stored": len(stored),
        "missing": len(missing),
        "missing_by_window": dict(Counter(window_of(answered_at[i]) for i in missing)),
        "missing_sample": [{"request_id": i, "answered_s": round(answered_at[i] - t0, 2)} for i in missing[:50]],
        "duplicated_answered": len(ids) - len(answered_set),
        "duplicated_stored": len(stored) - len(stored_set),
        "extra": len(stored_set - answered_set),
        "latency": {
            "overall": _latency(rows),
            "during_faults": _latency(inside),
            "outside_faults": _latency(outside),
            "by_fault": {w.name: _latency([r for r in rows if w.start <= r["t"] <= w.end]) for w in windows},
        },
        "per_second": per_second(rows, t0),
    }


def failures(figures: dict[str, Any], windows: list[Window]) -> list[str]:
    """Why the run failed: the conditions `make chaos` exits non-zero on."""
    found = []
    if figures["missing"]:
        found.append(f"{figures['missing']} answered predictions have no analytics row")
    duplicated = figures["duplicated_answered"] + figures["duplicated_stored"]
    if duplicated:
        found.append(f"{duplicated} request ids answered or stored twice")
    if figures["server_errors"]:
        found.append(f"5xx other than a shed: {figures['server_errors']}")
    if figures["answers_without_ids"]:
        found.append(f"{figures['answers_without_ids']} answers (200) without request ids")
    found += [f"fault {w.name} failed: {w.error}" for w in windows if w.error]
    return found
