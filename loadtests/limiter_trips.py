"""What a rate-limit check costs on Redis: `python -m loadtests.limiter_trips [--redis-url URL]`
(docs/performance.md, "One Redis round trip per rate-limit check").

Times, on one event loop, the limiter's check (`LimitsRateLimiter.hit`: the hit and the
window's state for the RateLimit headers in one script) beside the same check made with the
`limits` library's two calls (`hit`, then `get_window_stats`), in alternating rounds: wall time
per check (p50, p99) and the client's CPU per check (redis-py's encoding, parsing and
connection pool, on the worker's event loop in the service).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

from limits.aio import strategies
from limits.storage import storage_from_string

from storage.ratelimit import LimitsRateLimiter, parse_limit

LIMIT = parse_limit("1000000/minute")  # never reached: every check is a full hit


async def measure(check: Callable[[str], Awaitable[object]], calls: int) -> tuple[float, float, float]:
    """p50 and p99 wall time and mean CPU time per check, in microseconds."""
    client = f"bench-{uuid.uuid4()}"
    await check(client)  # the connection and the script are loaded before timing
    wall = []
    cpu_started = time.process_time()
    for _ in range(calls):
        started = time.perf_counter()
        await check(client)
        wall.append((time.perf_counter() - started) * 1e6)
    cpu = (time.process_time() - cpu_started) * 1e6 / calls
    wall.sort()
    return wall[len(wall) // 2], wall[int(len(wall) * 0.99)], cpu


async def run(redis_url: str, calls: int, rounds: int) -> None:
    assert LIMIT is not None
    limiter = LimitsRateLimiter(redis_url)
    library = strategies.MovingWindowRateLimiter(storage_from_string(f"async+{redis_url}", implementation="redispy"))

    async def one_script(client: str) -> object:
        return await limiter.hit("bench", client, LIMIT)

    async def two_calls(client: str) -> object:
        await library.hit(LIMIT, "bench", client)
        return await library.get_window_stats(LIMIT, "bench", client)

    cases = {"limits: hit + get_window_stats": two_calls, "one script (the service)": one_script}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, check in cases.items():
            results[name].append(await measure(check, calls))
    print(f"{calls} checks per round, {rounds} rounds, medians over the rounds (microseconds)")
    print(f"{'check':<34} {'p50':>8} {'p99':>8} {'CPU':>8}")
    for name, rows in results.items():
        p50, p99, cpu = (statistics.median(column) for column in zip(*rows, strict=True))
        print(f"{name:<34} {p50:8.1f} {p99:8.1f} {cpu:8.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    asyncio.run(run(args.redis_url, args.calls, args.rounds))


if __name__ == "__main__":
    main()
