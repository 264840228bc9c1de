"""The prediction cache: a Protocol, its Redis implementation and an in-process one.

Keys come from the model tag and a hash of the text exactly as the model sees it, so a model
never reads another model's entry and no raw text is kept in a key. The methods are coroutines
run on the worker's event loop: Redis is reached with redis-py's asyncio client, so a lookup
costs no thread hand-off (docs/performance.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from cachetools import TTLCache
from prometheus_client import Counter

CacheValue = dict[str, Any]
log = logging.getLogger(__name__)

CACHE_ERRORS = Counter(
    "sentiment_cache_errors_total",
    "Failed prediction cache operations (the request is answered uncached), by operation.",
    ["operation"],
)
for _operation in ("get", "set", "ping"):
    CACHE_ERRORS.labels(_operation)


def text_digest(text: str) -> str:
    """The sha256 of a text: the cache key's part and the analytics row's `text_sha256`."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_key(model_tag: str, text: str | None = None, digest: str | None = None) -> str:
    return f"sentiment:v1:{model_tag}:{digest or text_digest(text or '')}"


class PredictionCache(Protocol):
    """Looks up and stores predictions by key; never raises on a backend failure."""

    backend: str  # "memory" or "redis", the label of its dependency gauge

    async def get_many(self, keys: Sequence[str]) -> list[CacheValue | None]: ...

    async def set_many(self, items: dict[str, CacheValue]) -> None: ...

    @property
    def failing(self) -> bool:
        """Its last operation failed (and none has succeeded since)."""
        ...

    async def status(self) -> str:
        """`ok`, `down`, or `memory` for the embedded cache."""
        ...


class MemoryPredictionCache:
    """In-process LRU cache with a time to live, one per worker process. Used from one event
    loop only, so it needs no lock."""

    backend = "memory"

    def __init__(self, ttl_seconds: int, max_entries: int = 100_000) -> None:
        self._data: TTLCache[str, CacheValue] = TTLCache(maxsize=max_entries, ttl=ttl_seconds)

    async def get_many(self, keys: Sequence[str]) -> list[CacheValue | None]:
        return [self._data.get(k) for k in keys]

    async def set_many(self, items: dict[str, CacheValue]) -> None:
        self._data.update(items)

    async def status(self) -> str:
        return "memory"

    @property
    def failing(self) -> bool:
        return False


class RedisPredictionCache:
    """Redis cache shared by every worker and replica; JSON values, TTL per entry.

    Fails open: when Redis is down or slow, lookups miss and writes are dropped, so requests
    are answered uncached. One warning per outage; redis-py reconnects by itself, and the
    cache is used again as soon as a command succeeds.
    """

    backend = "redis"

    def __init__(self, url: str, ttl_seconds: int, timeout: float = 0.25, backoff_s: float = 1.0) -> None:
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.ttl = ttl_seconds
        # No retries: a failed call is a cache miss at once, not a second and more of backoff.
        self._client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=5,
            retry=Retry(NoBackoff(), 0),
        )
        self._down_since: float | None = None
        # After a failure, lookups and fills skip Redis for `backoff_s`: a hung Redis then costs
        # one timeout a second, not two per request (docs/chaos.md).
        self.backoff_s = backoff_s
        self._retry_at = 0.0
        self._probing = False
        self.errors = 0

    def _failed(self, exc: Exception, operation: str) -> None:
        self.errors += 1
        self._retry_at = time.monotonic() + self.backoff_s
        CACHE_ERRORS.labels(operation).inc()
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("prediction cache unavailable, serving uncached: %s", exc)

    @property
    def failing(self) -> bool:
        return self._down_since is not None

    def _ok(self) -> None:
        if self._down_since is not None:
            log.warning("prediction cache back after %.1f s", time.monotonic() - self._down_since)
            self._down_since = None

    def _backing_off(self) -> bool:
        """While Redis fails: skip it until the backoff ends, and then let one call at a time
        find out whether it is back (the others skip it meanwhile)."""
        if self._down_since is None:
            return False
        if self._probing or time.monotonic() < self._retry_at:
            return True
        self._probing = True
        return False

    async def get_many(self, keys: Sequence[str]) -> list[CacheValue | None]:
        if not keys or self._backing_off():
            return [None] * len(keys)
        try:
            raw = await self._client.mget(list(keys))
        except Exception as exc:
            self._failed(exc, "get")
            return [None] * len(keys)
        finally:
            self._probing = False
        self._ok()
        return [json.loads(v) if v is not None else None for v in raw]

    async def set_many(self, items: dict[str, CacheValue]) -> None:
        if not items or self._backing_off():
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, value in items.items():
                    pipe.set(key, json.dumps(value, separators=(",", ":")), ex=self.ttl)
                await pipe.execute()
        except Exception as exc:
            self._failed(exc, "set")
            return
        finally:
            self._probing = False
        self._ok()

    async def status(self) -> str:
        try:
            await self._client.ping()
        except Exception as exc:
            self._failed(exc, "ping")
            return "down"
        self._ok()
        return "ok"


def make_cache(redis_url: str | None, ttl_seconds: int, local_file: Path | str | None = None) -> PredictionCache:
    """Redis when a URL is configured; else the instance's shared SQLite file (storage/local.py)
    when one is given, so every worker sees every entry; else an in-process cache."""
    if redis_url:
        return RedisPredictionCache(redis_url, ttl_seconds)
    if local_file is not None:
        from storage.local import LocalPredictionCache

        return LocalPredictionCache(local_file, ttl_seconds)
    return MemoryPredictionCache(ttl_seconds)
