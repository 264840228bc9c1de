"""The prediction cache: a Protocol and its in-process implementation.

Keys come from the model tag and a hash of the text exactly as the model sees it, so a model
never reads another model's entry and no raw text is kept in a key.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import Any, Protocol

from cachetools import TTLCache

CacheValue = dict[str, Any]


def cache_key(model_tag: str, text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return f"sentiment:v1:{model_tag}:{digest}"


class PredictionCache(Protocol):
    """Looks up and stores predictions by key; never raises on a backend failure."""

    def get_many(self, keys: Sequence[str]) -> list[CacheValue | None]: ...

    def set_many(self, items: dict[str, CacheValue]) -> None: ...

    def status(self) -> str:
        """`ok`, `down`, or `memory` for the embedded cache."""
        ...


class MemoryPredictionCache:
    """In-process LRU cache with a time to live, one per worker process."""

    def __init__(self, ttl_seconds: int, max_entries: int = 100_000) -> None:
        self._data: TTLCache[str, CacheValue] = TTLCache(maxsize=max_entries, ttl=ttl_seconds)
        # cachetools caches are not thread-safe; sync endpoints run in a thread pool.
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[str]) -> list[CacheValue | None]:
        with self._lock:
            return [self._data.get(k) for k in keys]

    def set_many(self, items: dict[str, CacheValue]) -> None:
        with self._lock:
            self._data.update(items)

    def status(self) -> str:
        return "memory"

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)
