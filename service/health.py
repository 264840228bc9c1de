"""/health and its watcher: each worker checks its dependencies and memory every few seconds
on its event loop and keeps their last states, so a health probe costs no round trip and never
hangs; the same round sets the dependency, memory and saturation gauges.

Imports config, database and metrics."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

from service.config import CPUS, Settings
from service.database import DatabaseCalls
from service.metrics import (
    CONCURRENCY_LIMIT,
    DEPENDENCY_UP,
    MEMORY_LIMIT,
    RESIDENT_MEMORY,
    SATURATION,
)
from storage.analytics import AnalyticsStore
from storage.cache import PredictionCache
from storage.ratelimit import RateLimiter

log = logging.getLogger("sentiment")


def resident_memory_bytes() -> int:
    """This process's resident set size, from /proc (peak RSS where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_limit_bytes() -> int:
    """The cgroup v2 (or v1) memory limit, else the machine's physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value.isdigit() and 0 < int(value) < physical:
            return int(value)
    return physical


class GaugeWatcher:
    """A worker's gauges, refreshed every `interval` seconds on its event loop: dependencies,
    memory, the analytics log. It keeps the dependencies' last states for /health, so a health
    probe costs no round trip; each check is bounded in time, and a database check still
    running from the last round counts as down rather than piling up threads."""

    def __init__(
        self,
        cache: PredictionCache,
        limiter: RateLimiter,
        analytics: AnalyticsStore,
        database: DatabaseCalls,
        interval: float = 2.0,
        timeout_s: float = 2.0,
        concurrency_limit: Callable[[], float] | None = None,
        saturation: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        """`saturation`: each signal's value since its last call (SATURATION)."""
        self.cache = cache
        self.saturation = saturation
        self.concurrency_limit = concurrency_limit
        self.limiter = limiter
        self.analytics = analytics
        self.database = database
        self.interval = interval
        self.timeout_s = timeout_s
        self.database_status = "sqlite" if analytics.dialect == "sqlite" else "ok"
        self.cache_status = "memory" if cache.backend == "memory" else "ok"
        self.limiter_status = self.cache_status
        self._task: asyncio.Task[None] | None = None

    async def _bounded(self, check: Awaitable[str]) -> str:
        try:
            return await asyncio.wait_for(check, self.timeout_s)
        except Exception:
            return "down"

    async def _database(self) -> str:
        if self.database.stuck:
            return "down"
        try:
            return await self.database.run(self.analytics.status, timeout_s=self.timeout_s)
        except Exception:  # ApiError: failed, slow or stuck
            return "down"

    async def refresh(self) -> None:
        self.database_status, self.cache_status, self.limiter_status = await asyncio.gather(
            self._database(), self._bounded(self.cache.status()), self._bounded(self.limiter.status())
        )
        DEPENDENCY_UP.labels("cache", self.cache.backend).set(self.cache_status != "down")
        DEPENDENCY_UP.labels("database", self.analytics.dialect).set(self.database_status != "down")
        RESIDENT_MEMORY.set(resident_memory_bytes())
        MEMORY_LIMIT.set(memory_limit_bytes())
        if self.concurrency_limit is not None:
            CONCURRENCY_LIMIT.set(self.concurrency_limit())
        if self.saturation is not None:
            for signal, value in self.saturation().items():
                SATURATION.labels(signal).set(round(min(1.0, max(0.0, value)), 4))
        # The log folder's size is a directory scan: off the loop.
        await asyncio.to_thread(self.analytics.update_gauges)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="metrics-watch")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception:  # a gauge is not worth a worker: log and carry on
                log.exception("updating gauges failed")


def health_response(worker: Any, version: str) -> JSONResponse:
    """The /health answer of a worker (worker.Worker), from its watcher's last states and its
    analytics writer's last write: 200 while models serve ("degraded" with a dependency down),
    503 without any."""
    settings: Settings = worker.settings
    cache = "down" if worker.cache.failing else worker.gauges.cache_status
    database = "down" if not worker.analytics.healthy else worker.gauges.database_status
    serving = bool(worker.predictors)
    runtimes = {tag: p.runtime for tag, p in worker.predictors.items()}
    model: dict[str, Any] = {"A": worker.tag_a, "B": worker.tag_b, "runtimes": runtimes}
    model["threads"] = settings.threads_per_worker
    model["inference_threads"] = settings.inference_threads_per_worker
    model["workers"] = settings.service_workers
    model["cpus"] = {"available": CPUS.cpus, "from": CPUS.source}
    body = {
        "status": "ok" if serving and "down" not in (cache, database) else "degraded",
        "model": model,
        "cache": cache,
        "database": database,
        "rate_limiter": worker.gauges.limiter_status,
        "version": version,
    }
    return JSONResponse(body, status_code=200 if serving else 503)
