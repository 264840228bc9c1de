"""The embedded backends (no REDIS_URL): one SQLite file shared by every worker of the instance,
so a repeat is a cache hit on any worker and "100/minute" means 100 for the instance.

- `LocalPredictionCache`: the prediction cache, entries with a time to live.
- `LocalLimitsStorage`: a storage for the `limits` library (scheme `async+sqlite://<file>`): the
  moving-window strategy stays the library's; this only keeps its entries where every worker
  sees them.

Written on the standard library's sqlite3 rather than taken from a package: `limits` has no
storage that processes of one host share without a server, and diskcache (the obvious cache)
would add a dependency for what is two tables here. Each call is one short transaction
(microseconds, WAL, no fsync per commit), run on the event loop as the in-process cache's were
(the cache's fills of one turn of the loop in one);
a busy or broken file fails open like Redis: a miss, or a request let through and counted.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from limits.aio.storage import MovingWindowSupport, Storage

CacheValue = dict[str, Any]
SCHEMA = """
CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS cache_expires ON cache (expires);
CREATE TABLE IF NOT EXISTS window_entries (key TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS window_entries_key_at ON window_entries (key, at);
CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL, expires REAL NOT NULL);
"""


def connect(path: Path | str) -> sqlite3.Connection:
    """A connection to the shared file (created with its tables if missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # A short busy timeout: a worker waits at most this long for another's write, on its loop.
    conn = sqlite3.connect(str(path), timeout=0.5, isolation_level=None, check_same_thread=False)
    # Workers starting together race on switching the new file to WAL and on the first CREATE:
    # either can find the file locked for longer than the busy timeout on a loaded machine.
    for attempt in range(40):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
            break
        except sqlite3.OperationalError:
            if attempt == 39:
                raise
            time.sleep(0.05)
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[sqlite3.Connection]:
    """One explicit transaction on an autocommit connection: committed, or rolled back on any error."""
    conn.execute(begin)
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class LocalPredictionCache:
    """The prediction cache in the instance's shared SQLite file.

    Fills are written together, once per turn of the event loop: the requests that one forward
    call answers resume in the same turn, and their fills go in one transaction at the next
    turn instead of one commit each (cheaper in CPU, docs/performance.md). Each `set_many`
    returns once its fill is in the file, so an answer leaves only after every worker can hit it."""

    backend = "memory"  # the contract's name for the embedded cache (/health, gauges)

    def __init__(self, path: Path | str, ttl_seconds: int, max_entries: int = 200_000) -> None:
        self.path = Path(path)
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self._conn = connect(self.path)
        self._lock = threading.Lock()
        self._writes = 0
        self._pending: dict[str, tuple[CacheValue, float]] = {}
        self._written: asyncio.Future[None] | None = None  # the next write of the pending fills
        self.errors = 0
        self.failing = False

    async def get_many(self, keys: Sequence[str]) -> list[CacheValue | None]:
        now = time.time()
        pending = {k: v for k in keys if (v := self._pending.get(k)) is not None and v[1] > now}
        wanted = [k for k in keys if k not in pending]
        if not wanted:
            return [pending[k][0] for k in keys]
        try:
            with self._lock:
                marks = ",".join("?" * len(wanted))
                rows = self._conn.execute(
                    f"SELECT key, value FROM cache WHERE key IN ({marks}) AND expires > ?",  # noqa: S608  # placeholders only
                    [*wanted, now],
                ).fetchall()
        except sqlite3.Error:
            self.errors += 1
            self.failing = True
            return [pending[k][0] if k in pending else None for k in keys]
        self.failing = False
        found = {k: json.loads(v) for k, v in rows}
        found.update({k: v for k, (v, _) in pending.items()})
        return [found.get(k) for k in keys]

    async def set_many(self, items: dict[str, CacheValue]) -> None:
        if not items:
            return
        expires = time.time() + self.ttl
        self._pending.update({k: (v, expires) for k, v in items.items()})
        if self._written is None:
            loop = asyncio.get_running_loop()
            self._written = loop.create_future()
            loop.call_soon(self.write_pending)
        # shielded: a cancelled request must not cancel the write the others wait for
        await asyncio.shield(self._written)

    def write_pending(self) -> None:
        """The fills since the last write, in one transaction."""
        pending, self._pending = self._pending, {}
        written, self._written = self._written, None
        try:
            self._write(pending)
        finally:
            if written is not None and not written.done():
                written.set_result(None)

    def _write(self, pending: dict[str, tuple[CacheValue, float]]) -> None:
        if not pending:
            return
        try:
            with self._lock:
                with transaction(self._conn) as conn:
                    conn.executemany(
                        "INSERT OR REPLACE INTO cache (key, value, expires) VALUES (?, ?, ?)",
                        [(k, json.dumps(v), expires) for k, (v, expires) in pending.items()],
                    )
                self._writes += len(pending)
                if self._writes >= 1000:
                    self._writes = 0
                    self._trim()
        except sqlite3.Error:
            self.errors += 1

    def _trim(self) -> None:
        """Expired entries out, then the oldest tenth while over `max_entries` (each a few ms)."""
        self._conn.execute("DELETE FROM cache WHERE expires <= ?", (time.time(),))
        (count,) = self._conn.execute("SELECT count(*) FROM cache").fetchone()
        if count > self.max_entries:
            excess = count - self.max_entries + self.max_entries // 10
            self._conn.execute(
                "DELETE FROM cache WHERE key IN (SELECT key FROM cache ORDER BY expires LIMIT ?)", (excess,)
            )

    async def status(self) -> str:
        return "memory"


class LocalLimitsStorage(Storage, MovingWindowSupport):
    """`async+sqlite:///<file>`: the moving window's entries in the instance's shared file. The
    check and the insert of `acquire_entry` are one write transaction (BEGIN IMMEDIATE), so two
    workers never both take the last slot."""

    STORAGE_SCHEME = ["async+sqlite"]

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options: Any) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        assert uri is not None
        self._conn = connect(uri.split("://", 1)[1])
        self._lock = threading.Lock()
        self._acquired = 0
        self._longest_window = 0

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return sqlite3.Error

    def _write(self, sql: str, *params: Any) -> Any:
        with self._lock:
            return self._conn.execute(sql, params)

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        now = time.time()
        with self._lock, transaction(self._conn, "BEGIN IMMEDIATE") as conn:
            conn.execute("DELETE FROM window_entries WHERE key = ? AND at < ?", (key, now - expiry))
            (taken,) = conn.execute("SELECT count(*) FROM window_entries WHERE key = ?", (key,)).fetchone()
            allowed = taken + amount <= limit
            if allowed:
                conn.executemany("INSERT INTO window_entries VALUES (?, ?)", [(key, now)] * amount)
            self._acquired += 1
            self._longest_window = max(self._longest_window, expiry)
            if self._acquired % 1000 == 0:  # clients gone for good: their entries go too
                conn.execute("DELETE FROM window_entries WHERE at < ?", (now - self._longest_window,))
        return allowed

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = time.time()
        with self._lock:
            oldest, count = self._conn.execute(
                "SELECT min(at), count(*) FROM window_entries WHERE key = ? AND at >= ?", (key, now - expiry)
            ).fetchone()
        return (oldest, count) if count else (now, 0)

    # The fixed-window methods every limits storage has (the service uses the moving window).

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = time.time()
        with self._lock:
            self._conn.execute("DELETE FROM counters WHERE key = ? AND expires <= ?", (key, now))
            self._conn.execute(
                "INSERT INTO counters VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
                (key, amount, now + expiry),
            )
            (value,) = self._conn.execute("SELECT value FROM counters WHERE key = ?", (key,)).fetchone()
        return int(value)

    async def get(self, key: str) -> int:
        with self._lock:
            row = self._conn.execute(
                "SELECT value FROM counters WHERE key = ? AND expires > ?", (key, time.time())
            ).fetchone()
        return int(row[0]) if row else 0

    async def get_expiry(self, key: str) -> float:
        with self._lock:
            row = self._conn.execute("SELECT expires FROM counters WHERE key = ?", (key,)).fetchone()
        return float(row[0]) if row else time.time()

    async def check(self) -> bool:
        try:
            self._write("SELECT 1")
        except sqlite3.Error:
            return False
        return True

    async def reset(self) -> int | None:
        with self._lock:
            entries = self._conn.execute("DELETE FROM window_entries").rowcount
            counters = self._conn.execute("DELETE FROM counters").rowcount
        return int(entries + counters)

    async def clear(self, key: str) -> None:
        self._write("DELETE FROM window_entries WHERE key = ?", key)
        self._write("DELETE FROM counters WHERE key = ?", key)
