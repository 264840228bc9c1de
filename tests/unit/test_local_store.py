"""The embedded backends' shared SQLite file, used from several processes as workers use it."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
from pathlib import Path

from storage.cache import make_cache
from storage.ratelimit import make_limiter, parse_limit


def _hits(path: str, client: str, n: int, out: multiprocessing.Queue) -> None:
    async def run() -> int:
        limiter = make_limiter(None, path)
        limit = parse_limit("100/minute")
        assert limit is not None
        decisions = await asyncio.gather(*(limiter.hit("predict", client, limit) for _ in range(n)))
        return sum(d.allowed for d in decisions)

    out.put(asyncio.run(run()))


def test_a_limit_is_exact_across_processes_sharing_the_file(tmp_path: Path) -> None:
    """Four processes, as four workers, 50 hits each at 100/minute: exactly 100 pass."""
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_hits, args=(str(tmp_path / "e.sqlite"), "198.51.100.1", 50, out)) for _ in range(4)]
    for p in procs:
        p.start()
    allowed = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sum(allowed) == 100


def _set(path: str, key: str) -> None:
    asyncio.run(make_cache(None, 60, path).set_many({key: {"label": "positive", "score": 0.9}}))


def test_an_entry_one_process_sets_is_a_hit_in_another(tmp_path: Path) -> None:
    path = tmp_path / "e.sqlite"
    ctx = multiprocessing.get_context("spawn")
    writer = ctx.Process(target=_set, args=(str(path), "sentiment:v1:m:abc"))
    writer.start()
    writer.join(timeout=60)
    cache = make_cache(None, 60, path)
    found = asyncio.run(cache.get_many(["sentiment:v1:m:abc", "sentiment:v1:m:other"]))
    assert found == [{"label": "positive", "score": 0.9}, None]


def test_entries_expire_and_the_window_reports_its_use(tmp_path: Path) -> None:
    async def run() -> None:
        cache = make_cache(None, 1, tmp_path / "e.sqlite")
        await cache.set_many({"k": {"label": "negative"}})
        assert await cache.get_many(["k"]) == [{"label": "negative"}]
        cache.ttl = -1  # type: ignore[attr-defined]  # already expired when written
        await cache.set_many({"k": {"label": "negative"}})
        assert await cache.get_many(["k"]) == [None]
        limiter = make_limiter(None, tmp_path / "e.sqlite")
        limit = parse_limit("3/minute")
        assert limit is not None
        decisions = [await limiter.hit("batch", "203.0.113.9", limit) for _ in range(4)]
        assert [d.allowed for d in decisions] == [True, True, True, False]
        assert [d.remaining for d in decisions] == [2, 1, 0, 0]
        assert 0 < decisions[-1].reset_after <= 60
        assert await limiter.status() == "memory"

    asyncio.run(run())


def test_fills_of_one_loop_turn_are_written_together_before_any_returns(tmp_path: Path) -> None:
    """Requests answered by one forward call fill the cache in the same turn of the event loop:
    their entries go to the file in one transaction, and each fill returns only once its entry
    is there, where another worker hits it."""
    path = tmp_path / "e.sqlite"

    async def run() -> None:
        cache = make_cache(None, 60, path)
        other = make_cache(None, 60, path)  # another worker's
        statements: list[str] = []
        cache._conn.set_trace_callback(statements.append)  # type: ignore[attr-defined]
        fills = [cache.set_many({f"k{i}": {"label": "positive", "n": i}}) for i in range(5)]
        await asyncio.gather(*fills)
        assert [s.split()[0] for s in statements] == ["BEGIN", *["INSERT"] * 5, "COMMIT"]
        assert await other.get_many([f"k{i}" for i in range(5)]) == [{"label": "positive", "n": i} for i in range(5)]
        assert sqlite3.connect(path).execute("SELECT count(*) FROM cache").fetchone() == (5,)
        # a request cancelled while its fill waits does not cancel the write another waits for
        waiting = asyncio.ensure_future(cache.set_many({"k5": {"label": "negative"}}))
        await asyncio.sleep(0)
        alone = cache.set_many({"k6": {"label": "negative"}})
        waiting.cancel()
        await alone
        assert await other.get_many(["k5", "k6"]) == [{"label": "negative"}, {"label": "negative"}]
        cache.ttl = -1  # type: ignore[attr-defined]  # expired already: not answered
        await cache.set_many({"k7": {"label": "negative"}})
        assert await cache.get_many(["k7"]) == [None]

    asyncio.run(run())
