"""The 503s of overload: a worker takes only the requests it can answer within the queue-delay
budget, refusing the rest at the door (in-flight count, adaptive limit, event loop lag).

Imports clients (the per-client slots of /jobs), errors and metrics."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.clients import ClientSlots, Network, scope_client
from service.errors import error_response


class LoopLag:
    """How late this worker's event loop runs a callback that is due: a task that sleeps
    `interval` and measures by how much it overslept. Every ready callback of every request
    waits about that long each time it awaits, so a lagging loop delays all requests, cached
    ones included, beyond anything the batcher's queue shows."""

    def __init__(self, interval: float = 0.02, ticks: int = 3) -> None:
        self.interval = interval
        self.seconds = 0.0
        self._recent: deque[float] = deque(maxlen=ticks)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            # The least lag of the last few ticks: a loop that is late on every one of them is
            # overloaded; one stall (the analytics writer flushing a backlog, a garbage
            # collection) is not, and shedding for it refused requests at 8 clients.
            self._recent.append(max(0.0, loop.time() - due))
            self.seconds = min(self._recent)


class Occupancy:
    """The time-weighted mean of a count (requests in flight) between two reads: the area under
    the count over time, divided by the time. Changed and read on one event loop."""

    def __init__(self) -> None:
        self.count = 0
        self._area = 0.0
        self._since = self._changed = time.monotonic()

    def change(self, delta: int) -> None:
        now = time.monotonic()
        self._area += self.count * (now - self._changed)
        self._changed = now
        self.count += delta

    def mean(self) -> float:
        """The mean count since the last read (the count itself if no time has passed)."""
        now = time.monotonic()
        area = self._area + self.count * (now - self._changed)
        mean = area / (now - self._since) if now > self._since else float(self.count)
        self._area, self._since, self._changed = 0.0, now, now
        return mean


class AdaptiveLimit:
    """How many requests a worker takes at once, adapted to the time they take: additive
    increase, multiplicative decrease on latency (the AIMD limit of Netflix's concurrency-limits,
    with TCP's congestion-avoidance step). Each prediction request that took longer than
    `target_s` (or was shed inside) cuts the limit by `backoff`; one within it, while the limit
    was in use (at least half of it in flight), raises it by 1/limit, about one per limit's
    worth of answers. An overloaded worker so settles near the concurrency it can answer within
    the target, and the requests beyond it are refused at the door in microseconds instead of
    all waiting their turn for the CPU (docs/loadtests.md, the spike). Once no request has been
    slow for `recovery_s`, the overload is over: a fast request puts a limit that is still below
    `initial` back there, as a limit left low would refuse the next burst of light traffic
    (docs/loadtests.md). Written here: the
    Python libraries for this limit an outgoing call's concurrency, not an ASGI server's.
    """

    def __init__(
        self,
        target_s: float,
        *,
        initial: int = 64,
        minimum: int = 8,
        maximum: int = 512,
        backoff: float = 0.9,
        recovery_s: float = 5.0,
    ) -> None:
        self.target_s = target_s
        self.recovery_s = recovery_s
        self._slow_at = -math.inf
        self.minimum = minimum
        self.maximum = maximum
        self.backoff = backoff
        self.initial = float(min(max(initial, minimum), maximum))
        self.limit = self.initial

    def sample(self, seconds: float, in_flight: int, overloaded: bool = False, now: float | None = None) -> None:
        """One finished request: its time in the worker and how many were in flight with it."""
        now = time.monotonic() if now is None else now
        if overloaded or seconds > self.target_s:
            self._slow_at = now
            self.limit = max(self.minimum, self.limit * self.backoff)
        elif self.limit < self.initial and now - self._slow_at >= self.recovery_s:
            self.limit = self.initial
        elif in_flight * 2 >= self.limit:
            self.limit = min(self.maximum, self.limit + 1 / self.limit)


class InFlightLimit:
    """503 with Retry-After when more than `limit` requests are in flight in this worker (or,
    with `adaptive`, more than its current limit), or when its event loop lags more than
    `max_lag_s` (`lag`): refused at the door, before the body is read or Redis asked, so the
    refusal itself costs the loop little. `adaptive` learns from the requests to `sampled`
    paths (the predictions: the others' times say nothing about the model's queue).

    BentoML's own `traffic.max_concurrency` answers a bare 429 that clients would take for a
    rate limit, and it also counts the internal batching calls; this guard counts only the
    public requests it wraps.

    A connection that comes back before its `Retry-After` has passed and is refused again gets
    that refusal after `pace_s`: clients that retry at once, ignoring `Retry-After`, otherwise
    turn the refusals themselves into the overload (docs/decisions.md, "Paced refusals"). A
    first refusal is immediate.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        paths: Sequence[str],
        retry_after: int = 1,
        lag: LoopLag | None = None,
        max_lag_s: float = float("inf"),
        adaptive: AdaptiveLimit | None = None,
        sampled: Sequence[str] = (),
        pace_s: float = 0.1,
        per_client: int = 0,
        per_client_setting: str = "",
        trusted: Sequence[Network] = (),
        occupancy: Occupancy | None = None,
    ) -> None:
        """`per_client`: with it, at most that many of a client's requests at once (429 beyond):
        the client as the rate limits count it (`trusted` proxies). `occupancy` follows the
        requests in flight over time (the saturation gauge's in-flight share)."""
        self.app = app
        self.occupancy = occupancy
        self.slots = ClientSlots(per_client, per_client_setting, trusted, retry_after) if per_client else None
        self.pace_s = pace_s
        self.paced = 0
        self._refused_at: dict[Any, float] = {}  # connection (the peer's address and port) -> last refusal
        self.limit = limit
        self.paths = tuple(paths)
        self.adaptive = adaptive
        self.sampled = tuple(sampled)
        self.retry_after = retry_after
        self.lag = lag
        self.max_lag_s = max_lag_s
        self.in_flight = 0
        self.rejected = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.paths):
            await self.app(scope, receive, send)
            return
        lagging = self.lag is not None and self.lag.seconds > self.max_lag_s
        limit = min(self.limit, self.adaptive.limit) if self.adaptive is not None else self.limit
        if self.in_flight >= limit or lagging:
            self.rejected += 1
            reason = "loop_lag" if lagging else "in_flight"
            metrics.OVERLOAD_REJECTIONS.labels(metrics.endpoint_label(scope["path"]), reason).inc()
            if self._back_too_soon(scope.get("client")):
                self.paced += 1
                await asyncio.sleep(self.pace_s)
            retry = {"Retry-After": str(self.retry_after)}
            await error_response(scope, 503, "service overloaded, retry later", retry)(scope, receive, send)
            return
        client = scope_client(scope, self.slots.trusted) if self.slots is not None else ""
        if self.slots is not None and self.slots.full(client):
            await self.slots.refusal(scope)(scope, receive, send)
            return
        adaptive = self.adaptive if scope["path"].startswith(self.sampled) else None
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.in_flight += 1
        if self.occupancy is not None:
            self.occupancy.change(1)
        if self.slots is not None:
            self.slots.take(client)
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send if adaptive is None else send_status)
        finally:
            if adaptive is not None:
                adaptive.sample(time.perf_counter() - start, self.in_flight, overloaded=status == 503)
            self.in_flight -= 1
            if self.occupancy is not None:
                self.occupancy.change(-1)
            if self.slots is not None:
                self.slots.give_back(client)

    def _back_too_soon(self, client: Any) -> bool:
        """Whether this connection was refused less than `retry_after` ago (and note this refusal)."""
        if client is None:
            return False
        connection = tuple(client)
        now = time.monotonic()
        last = self._refused_at.get(connection)
        if len(self._refused_at) >= 10_000:  # connections gone for good: forgotten
            self._refused_at.clear()
        self._refused_at[connection] = now
        return last is not None and now - last < self.retry_after
