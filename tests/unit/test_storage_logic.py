"""Pure logic of the storage layer: cache keys, the TTL cache, the A/B statistics, the spill log's write."""

from __future__ import annotations

import asyncio
import errno
import math
import os
from pathlib import Path

import pytest

from storage.analytics.stats import percentile, two_proportion_p_value, wilson_interval
from storage.cache import MemoryPredictionCache, cache_key, text_digest
from storage.ratelimit import LimitsRateLimiter, parse_limit


def test_cache_key_depends_on_model_and_text_only() -> None:
    assert cache_key("m:1", "good") == cache_key("m:1", digest=text_digest("good"))
    assert cache_key("m:1", "good") == cache_key("m:1", "good")
    assert cache_key("m:1", "good") != cache_key("m:2", "good")
    assert cache_key("m:1", "good") != cache_key("m:1", "Good")
    assert "good" not in cache_key("m:1", "good")


def test_memory_cache_expires_entries() -> None:
    async def scenario() -> None:
        cache = MemoryPredictionCache(ttl_seconds=1)
        await cache.set_many({"a": {"label": "positive"}})
        assert await cache.get_many(["a", "b"]) == [{"label": "positive"}, None]
        await asyncio.sleep(1.1)
        assert await cache.get_many(["a"]) == [None]

    asyncio.run(scenario())


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 0) is None


def test_two_proportion_test_known_values() -> None:
    # 60/100 against 45/100: z = 2.1234, two-sided p = 0.0337
    assert two_proportion_p_value(60, 100, 45, 100) == pytest.approx(0.0337, abs=1e-3)
    assert two_proportion_p_value(5, 10, 5, 10) == pytest.approx(1.0)
    assert two_proportion_p_value(1, 0, 1, 1) is None


def test_percentile_matches_percentile_cont() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0.5) == 2.5
    assert percentile(values, 0.95) == pytest.approx(3.85)
    assert percentile([], 0.5) is None
    assert math.isclose(percentile([7.0], 0.99), 7.0)


def test_limiter_counts_a_moving_window_per_client() -> None:
    async def scenario() -> None:
        limiter = LimitsRateLimiter("memory://")
        limit = parse_limit("3/minute")
        assert limit is not None
        decisions = [await limiter.hit("predict", "a", limit) for _ in range(4)]
        assert [d.allowed for d in decisions] == [True, True, True, False]
        assert [d.remaining for d in decisions] == [2, 1, 0, 0]
        assert decisions[-1].headers()["Retry-After"]
        assert (await limiter.hit("predict", "b", limit)).allowed
        assert await limiter.status() == "memory"

    asyncio.run(scenario())
    assert parse_limit("0") is None


def test_the_spill_logs_write_appends_whole_and_reports_errors(tmp_path: Path) -> None:
    from storage.analytics import spill

    assert spill._write is not os.write  # the C library's write(2), called with the GIL held
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    assert spill._write(fd, b'{"a":1}\n') == 8
    assert spill._write(fd, b'{"b":2}\n') == 8
    os.close(fd)
    assert path.read_bytes() == b'{"a":1}\n{"b":2}\n'
    with pytest.raises(OSError) as failed:
        spill._write(fd, b"closed")
    assert failed.value.errno == errno.EBADF
