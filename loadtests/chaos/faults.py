"""The faults, each acting on the run's own throwaway servers, the timeline that injects them, and
the tally of what they cost.

Every fault returns its window: when it started and when the thing it broke was back (a
server answering again, a replacement worker started, the service ready), with what was done.

The tally: Locust's records (the locustfile's ChaosUser) against the analytics table. Answered ids
(from 200 bodies) are compared with `SELECT request_id FROM predictions`: missing (answered, not
stored), duplicated (answered twice, or stored twice), extra (stored, never answered: in flight
when a worker died or a connection broke). Statuses are counted with a 503 that carries
`Retry-After` apart (a shed) and connection errors by type; latencies are of answered requests,
overall, per fault window and outside every window, and per second.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import sqlalchemy as sa

from loadtests.harness import metric_totals, percentile
from tests.support.servers import PostgresServer, RedisServer
from tests.support.serving import Served

# The faults, in the order they are injected.
REDIS_HANG = "redis-hang"
REDIS_KILL = "redis-kill"
POSTGRES_STOP = "postgres-stop"
POSTGRES_BLACKHOLE = "postgres-blackhole"
WORKER_KILL = "worker-kill"
SERVICE_RESTART = "service-restart"

DESCRIPTIONS = {
    REDIS_HANG: "Redis SIGSTOPped, then SIGCONT",
    REDIS_KILL: "Redis SIGKILLed, restarted on the same port",
    POSTGRES_STOP: "PostgreSQL stopped with `pg_ctl stop -m immediate`, then started",
    POSTGRES_BLACKHOLE: "the postmaster and all its backends SIGSTOPped, then SIGCONT",
    WORKER_KILL: "one BentoML worker SIGKILLed; the window ends when its replacement is ready",
    SERVICE_RESTART: "`bentoml serve` SIGTERMed, then started again with the same env and SPILL_DIR",
}


@dataclass(frozen=True)
class Fault:
    name: str
    at_s: float  # planned start, seconds after the load started (later if the previous one ran late)
    hold_s: float = 0  # how long the server stays stopped, hung or down


# A BentoML 1.4 worker: a Python process of its own under `bentoml serve`'s arbiter.
WORKER_MODULE = "_bentoml_impl.worker.service"
# What a worker logs once its service instance is up (its startup hook done).
WORKER_READY = "Completed async startup hook"


@dataclass
class Window:
    """One fault as it happened: epoch seconds, what was done, and an error if it went wrong."""

    name: str
    start: float
    end: float
    detail: str = ""
    error: str | None = None

    def as_dict(self, t0: float) -> dict[str, Any]:
        return {**asdict(self), "start_s": round(self.start - t0, 2), "end_s": round(self.end - t0, 2)}


@dataclass
class Stack:
    """The servers the faults act on."""

    redis: RedisServer
    postgres: PostgresServer
    served: Served


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(pid, sig)


def redis_hang(stack: Stack, hold_s: float) -> str:
    assert stack.redis.proc is not None
    pid = stack.redis.proc.pid
    _signal([pid], signal.SIGSTOP)
    try:
        time.sleep(hold_s)
    finally:
        _signal([pid], signal.SIGCONT)
    return f"redis-server {pid} stopped for {hold_s:g} s"


def redis_kill(stack: Stack, hold_s: float) -> str:
    proc = stack.redis.proc
    assert proc is not None
    proc.kill()
    proc.wait()
    stack.redis.proc = None
    time.sleep(hold_s)
    stack.redis.start()  # the same port, empty: nothing is kept on disk
    assert stack.redis.proc is not None
    return f"redis-server {proc.pid} killed, {stack.redis.proc.pid} started after {hold_s:g} s"


def postgres_stop(stack: Stack, hold_s: float) -> str:
    stack.postgres.stop(mode="immediate")
    time.sleep(hold_s)
    stack.postgres.start()
    return f"down {hold_s:g} s, then started (crash recovery)"


def postgres_processes(server: PostgresServer) -> list[int]:
    """The postmaster first, then its children: the backends and auxiliary processes."""
    postmaster = psutil.Process(server.pid())
    return [postmaster.pid, *(p.pid for p in postmaster.children(recursive=True))]


def postgres_blackhole(stack: Stack, hold_s: float) -> str:
    # The postmaster first, so it starts no backend that would escape the stop.
    pids = postgres_processes(stack.postgres)
    _signal(pids, signal.SIGSTOP)
    try:
        time.sleep(hold_s)
    finally:
        _signal(pids, signal.SIGCONT)
    return f"{len(pids)} processes stopped for {hold_s:g} s (connections accepted by the kernel, never answered)"


def workers(served: Served) -> list[psutil.Process]:
    """The serve process's worker processes (not the arbiter that starts them)."""
    assert served.proc is not None
    found = []
    for proc in psutil.Process(served.proc.pid).children(recursive=True):
        try:
            if WORKER_MODULE in proc.cmdline():
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _clients(proc: psutil.Process, port: int) -> int:
    """Client connections the worker holds on the service's port."""
    try:
        return sum(
            1 for c in proc.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
        )
    except psutil.Error:
        return 0


def worker_kill(stack: Stack, hold_s: float, timeout: float = 120) -> str:
    before = workers(stack.served)
    if not before:
        raise RuntimeError("no worker process found under bentoml serve")
    # The worker holding the most clients' connections: Locust's users keep theirs open, and
    # the workers share one listening socket, so one worker may hold most of them, or all.
    clients = {p.pid: _clients(p, stack.served.port) for p in before}
    victim = max(before, key=lambda p: clients[p.pid])
    ready = stack.served.tail(10**9).count(WORKER_READY)
    victim.kill()
    deadline = time.monotonic() + timeout
    while stack.served.tail(10**9).count(WORKER_READY) <= ready:
        if time.monotonic() > deadline:
            return f"worker {victim.pid} killed; no replacement ready within {timeout:.0f} s"
        time.sleep(0.2)
    new = sorted({p.pid for p in workers(stack.served)} - {p.pid for p in before})
    held = " + ".join(str(clients[p.pid]) for p in before)
    return (
        f"worker {victim.pid} killed, holding {clients[victim.pid]} of the workers' {held} client connections; "
        f"replacement {', '.join(map(str, new)) or '?'} ready"
    )


def service_restart(stack: Stack, hold_s: float) -> str:
    stopping = time.monotonic()
    stack.served.stop()  # SIGTERM to the group, as an orchestrator would
    stopped = time.monotonic() - stopping
    stack.served.start(timeout=300)
    ready = time.monotonic() - stopping - stopped
    return f"stopped in {stopped:.1f} s (SIGTERM), ready again {ready:.1f} s later"


FAULTS: dict[str, Callable[[Stack, float], str]] = {
    REDIS_HANG: redis_hang,
    REDIS_KILL: redis_kill,
    POSTGRES_STOP: postgres_stop,
    POSTGRES_BLACKHOLE: postgres_blackhole,
    WORKER_KILL: worker_kill,
    SERVICE_RESTART: service_restart,
}


def inject(fault: Fault, stack: Stack) -> Window:
    start = time.time()
    try:
        detail, error = FAULTS[fault.name](stack, fault.hold_s), None
    except Exception as exc:  # recorded: the run is judged failed, the load and the rest go on
        detail, error = "", f"{type(exc).__name__}: {exc}"
    return Window(fault.name, start, time.time(), detail, error)


def run_timeline(
    faults: tuple[Fault, ...], stack: Stack, t0: float, log: Callable[[str], None] = print
) -> list[Window]:
    """Each fault at its planned second after `t0` (at once if the one before ran late)."""
    windows = []
    for fault in faults:
        delay = t0 + fault.at_s - time.time()
        if delay > 0:
            time.sleep(delay)
        log(f"[{time.time() - t0:6.1f} s] {fault.name}: {DESCRIPTIONS[fault.name]}")
        window = inject(fault, stack)
        log(f"[{window.end - t0:6.1f} s] {fault.name} over: {window.error or window.detail}")
        windows.append(window)
    return windows


# --- the tally -------------------------------------------------------------------------------

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


# --- the database ------------------------------------------------------------------------


def row_count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM predictions")).scalar_one())


def stored_ids(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT request_id FROM predictions")).scalars())


def _waiting_rows(url: str) -> float | None:
    """Rows the workers hold in memory plus spill bytes, from /metrics; None when unreachable."""
    try:
        return sum(metric_totals(url, WAITING, timeout=5).values())
    except httpx.HTTPError:
        return None


WAITING = ("sentiment_analytics_buffered_rows", "sentiment_analytics_spill_bytes")


def wait_drained(
    engine: sa.Engine, url: str, timeout: float, steady_s: float = 5, log: Callable[[str], None] = print
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
        waiting = _waiting_rows(url)
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
