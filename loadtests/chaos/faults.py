"""The faults, each acting on the run's own throwaway servers, and the timeline that injects them.

Every fault returns its window: when it started and when the thing it broke was back (a
server answering again, a replacement worker started, the service ready), with what was done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from loadtests.chaos import plan
from tests.support.servers import PostgresServer, RedisServer
from tests.support.serving import Served

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
    plan.REDIS_HANG: redis_hang,
    plan.REDIS_KILL: redis_kill,
    plan.POSTGRES_STOP: postgres_stop,
    plan.POSTGRES_BLACKHOLE: postgres_blackhole,
    plan.WORKER_KILL: worker_kill,
    plan.SERVICE_RESTART: service_restart,
}


def inject(fault: plan.Fault, stack: Stack) -> Window:
    start = time.time()
    try:
        detail, error = FAULTS[fault.name](stack, fault.hold_s), None
    except Exception as exc:  # recorded: the run is judged failed, the load and the rest go on
        detail, error = "", f"{type(exc).__name__}: {exc}"
    return Window(fault.name, start, time.time(), detail, error)


def run_timeline(
    faults: tuple[plan.Fault, ...], stack: Stack, t0: float, log: Callable[[str], None] = print
) -> list[Window]:
    """Each fault at its planned second after `t0` (at once if the one before ran late)."""
    windows = []
    for fault in faults:
        delay = t0 + fault.at_s - time.time()
        if delay > 0:
            time.sleep(delay)
        log(f"[{time.time() - t0:6.1f} s] {fault.name}: {plan.DESCRIPTIONS[fault.name]}")
        window = inject(fault, stack)
        log(f"[{window.end - t0:6.1f} s] {fault.name} over: {window.error or window.detail}")
        windows.append(window)
    return windows
