"""Per-client rate limits: a Protocol and an implementation on the `limits` library.

`limits` gives an atomic moving window on every storage it supports: in-process memory here
(one window per worker) and Redis when REDIS_URL is set (one window for every worker and
replica). Its asyncio API is used, on the worker's event loop (Redis through redis-py's asyncio
client): no thread hand-off per request. A storage failure lets the request through and is
counted, never raised.

On Redis, one script (`HIT_AND_WINDOW`) makes the hit and reads the window for the RateLimit
headers in a single round trip, on the library's own keys and connection; `limits` has a call
for each (`hit`, then `get_window_stats`), two round trips per request.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from limits import RateLimitItem, parse
from limits.aio import strategies
from limits.storage import storage_from_string
from prometheus_client import Counter

log = logging.getLogger(__name__)

LIMITER_ERRORS = Counter(
    "sentiment_rate_limiter_errors_total",
    "Rate-limit checks that failed on the limiter's storage, or were skipped in the second after such"
    " a failure, and let the request through.",
)


@dataclass(frozen=True)
class Decision:
    """Whether a hit is allowed, and what the RateLimit headers should say."""

    allowed: bool
    limit: int
    remaining: int
    reset_after: int
    window_seconds: int

    def headers(self) -> dict[str, str]:
        headers = {
            "RateLimit-Policy": f"{self.limit};w={self.window_seconds}",
            "RateLimit": f"limit={self.limit}, remaining={self.remaining}, reset={self.reset_after}",
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, self.reset_after))
        return headers


def parse_limit(spec: str) -> RateLimitItem | None:
    """A limits item from "100/minute" and the like; None for "0" (no limit)."""
    if spec.strip() in ("", "0"):
        return None
    return parse(spec)


class RateLimiter(Protocol):
    async def hit(self, scope: str, client: str, limit: RateLimitItem) -> Decision: ...

    async def status(self) -> str: ...


# The library's moving window (limits/resources/redis/lua_scripts/acquire_moving_window.lua and
# moving_window.lua, one list per client and limit, newest timestamp first, trimmed to the
# limit) as one script: the hit, then the count of entries inside the window and the oldest of
# them. Written here because limits offers no call returning both; tests/integration/
# test_storage.py checks it against the library's own get_window_stats on the same keys.
# KEYS[1]: the window's list; ARGV: now, limit, window seconds. Returns {allowed 1|0, count, oldest}.
HIT_AND_WINDOW = """
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local expiry = tonumber(ARGV[3])
local start = now - expiry
local allowed = 1
local entry = redis.call('lindex', KEYS[1], limit - 1)
if entry and tonumber(entry) >= start then
    allowed = 0
else
    redis.call('lpush', KEYS[1], ARGV[1])
    redis.call('ltrim', KEYS[1], 0, limit - 1)
    redis.call('expire', KEYS[1], expiry)
end
local low, high, last = 0, redis.call('llen', KEYS[1]) - 1, -1
while low <= high do
    local mid = math.floor((low + high) / 2)
    if tonumber(redis.call('lindex', KEYS[1], mid)) >= start then
        last = mid
        low = mid + 1
    else
        high = mid - 1
    end
end
if last < 0 then
    return {allowed, 0, ARGV[1]}
end
return {allowed, last + 1, redis.call('lindex', KEYS[1], last)}
"""


class LimitsRateLimiter:
    """A moving-window limiter on a `limits` storage URI (`memory://`, `redis://...`), through
    the library's asyncio storages (`async+memory://`, `async+redis://` with redis-py)."""

    def __init__(self, storage_uri: str = "memory://", **options: object) -> None:
        self._embedded = storage_uri.startswith(("memory://", "sqlite://", "async+sqlite://"))
        uri = storage_uri if storage_uri.startswith("async+") else f"async+{storage_uri}"
        if not storage_uri.startswith(("memory://", "sqlite://", "async+sqlite://")):
            options = {"implementation": "redispy", **options}
        self._storage = storage_from_string(uri, **options)  # type: ignore[arg-type]  # passed on to redis.asyncio.Redis
        self._limiter = strategies.MovingWindowRateLimiter(self._storage)
        bridge = getattr(self._storage, "bridge", None)  # limits' Redis storages: the connection and key prefix
        self._bridge = bridge
        self._hit_and_window = bridge.get_connection().register_script(HIT_AND_WINDOW) if bridge else None
        self.errors = 0
        # After a storage failure, checks let requests through without asking for `backoff_s`:
        # a hung Redis then costs one timeout a second, not one per request.
        self.backoff_s = 1.0
        self._retry_at = 0.0
        self._failing = False
        self._probing = False

    async def hit(self, scope: str, client: str, limit: RateLimitItem) -> Decision:
        window = limit.get_expiry()
        # Failing: let requests through unchecked (counted) until the backoff ends, then let
        # one check at a time find out whether the storage is back.
        if self._failing and (self._probing or time.monotonic() < self._retry_at):
            LIMITER_ERRORS.inc()
            return Decision(True, limit.amount, limit.amount, window, window)
        self._probing = self._failing
        decision: Decision | None = None
        try:
            if self._hit_and_window is not None:  # Redis: the decision and its headers at once
                decision = await self._hit_redis(scope, client, limit)
            else:
                allowed = await self._limiter.hit(limit, scope, client)
        except Exception as exc:  # fail open: a limiter outage must not stop predictions
            self._failed(exc)
            return Decision(True, limit.amount, limit.amount, window, window)
        finally:
            self._probing = False
        self._failing = False
        if decision is not None:
            return decision
        try:
            stats = await self._limiter.get_window_stats(limit, scope, client)
        except Exception as exc:  # the decision stands; only the headers are approximate
            self._failed(exc)
            return Decision(allowed, limit.amount, 0 if not allowed else limit.amount - 1, window, window)
        reset = max(0, math.ceil(stats.reset_time - time.time()))
        return Decision(allowed, limit.amount, max(0, stats.remaining), reset, window)

    async def _hit_redis(self, scope: str, client: str, limit: RateLimitItem) -> Decision:
        """The hit and the window's state in one round trip (HIT_AND_WINDOW); raises on a storage
        failure, which `hit` handles."""
        assert self._hit_and_window is not None and self._bridge is not None
        window = limit.get_expiry()
        key = self._bridge.prefixed_key(limit.key_for(scope, client))
        now = time.time()
        allowed, count, oldest = await self._hit_and_window([key], [repr(now), limit.amount, window])
        reset = max(0, math.ceil(float(oldest) + window - now))
        return Decision(bool(allowed), limit.amount, max(0, limit.amount - int(count)), reset, window)

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        self._failing = True
        self._retry_at = time.monotonic() + self.backoff_s
        LIMITER_ERRORS.inc()
        if self.errors == 1 or self.errors % 1000 == 0:
            log.warning("rate limiter storage failed (%s errors so far): %s", self.errors, exc)

    async def status(self) -> str:
        if self._embedded:
            return "memory"
        try:
            return "ok" if await self._storage.check() else "down"  # type: ignore[misc]  # an async storage
        except Exception:
            return "down"


def make_limiter(redis_url: str | None, local_file: Path | str | None = None) -> LimitsRateLimiter:
    """One window per client across all workers and replicas with Redis; across the instance's
    workers with its shared SQLite file (storage/local.py); per worker with neither."""
    if redis_url:
        # Bounded timeouts: a Redis that is down or hung must not hold requests, so the limiter
        # fails open; 1 s rather than the cache's 250 ms, because a call that times out while
        # Redis is merely busy lets a request through uncounted (the cache only misses a hit).
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        return LimitsRateLimiter(redis_url, socket_timeout=1.0, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    if local_file is not None:
        import storage.local  # noqa: F401  # registers the async+sqlite storage with limits

        return LimitsRateLimiter(f"async+sqlite://{local_file}")
    return LimitsRateLimiter("memory://")
