"""Request guards and middleware in front of the endpoints: body size, in-flight load and event
loop lag, client identity, the request context (id, metrics, error counts) and JSON 404s.

Imports metrics only; service.py wires these around the app."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import error_body, scope_request_id
from service.request_ids import random_uuid

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(trusted: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(net, strict=False) for net in trusted)


def _identity(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """IPv4 clients by address; IPv6 clients by /64, the block one subscriber usually holds
    (counting each of its 2^64 addresses apart would make a limit per address meaningless)."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def client_address(peer: str | None, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """The client a rate limit counts: the peer, or, when the peer is a trusted proxy, the
    rightmost X-Forwarded-For address that is not itself a trusted proxy. Entries to the left of
    it were written by the client (or by proxies it chose) and are never believed; each trusted
    proxy appends the address it saw, so the rightmost untrusted one is the real client."""
    if not peer:
        return "unknown"
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if forwarded_for and trusted and any(addr in net for net in trusted):
        for entry in reversed(forwarded_for.split(",")):
            try:
                hop = ipaddress.ip_address(entry.strip())
            except ValueError:
                break  # garbage where an address should be: believe nothing further left
            addr = hop
            if not any(hop in net for net in trusted):
                break
    return _identity(addr)


async def send_json_bytes(send: Send, status: int, payload: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """A whole JSON answer, already encoded, with `headers` after its content type and length."""
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


async def send_error(
    scope: Scope, send: Send, status: int, message: str, headers: dict[str, str], **extra: Any
) -> None:
    """An error answer written outside the FastAPI app: the contract's body (errors.error_body,
    with `extra` fields), with the request's id, as the app's handlers write theirs."""
    rid = scope_request_id(scope)
    raw = [(k.lower().encode(), v.encode()) for k, v in {**headers, "X-Request-ID": rid}.items()]
    await send_json_bytes(send, status, json.dumps(error_body(message, rid, **extra)).encode(), raw)


def cap_send_buffers(nbytes: int) -> int:
    """Set SO_SNDBUF on this process's listening TCP sockets, which the connections they accept
    inherit; returns how many were set (0 with `nbytes` 0, which keeps the kernel's autotuning).

    The kernel grows a connection's send buffer up to 4 MiB (tcp_wmem) while its reader does
    not read: each results stream left unread made the worker read and encode that much before a
    send blocked and JOB_SEND_TIMEOUT_SECONDS began to count. Neither uvicorn nor the ASGI scope
    hands the accepted sockets over, and BentoML's workers get the listening one as a descriptor,
    so it is found among the process's descriptors (Linux's /proc; elsewhere nothing is set)."""
    if nbytes <= 0:
        return 0
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return 0
    count = 0
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # not a socket, or the listing's own descriptor, closed since
            continue
        try:
            listening = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
            if listening and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes)
                count += 1
        except OSError:
            pass
        finally:
            sock.detach()  # the descriptor stays open, owned by whoever opened it
    return count


def replaying(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that gives back the messages already read, then reads on."""

    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return replay


class BodySizeLimit:
    """413 for bodies over `max_bytes`: from Content-Length before reading anything, or, for a
    body without one (chunked), as soon as the bytes read pass the limit. Such a body is read
    here before the app sees it: FastAPI would turn an error raised mid-read into a 400. The
    `streamed` paths (POST /jobs) count their bodies themselves as they parse them, so here they
    are refused by Content-Length only, never buffered."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        larger: dict[str, tuple[int, str]] | None = None,
        streamed: Sequence[str] = (),
    ) -> None:
        """`larger`: paths with a limit of their own, {path: (bytes, the setting's name)}."""
        self.app = app
        self.max_bytes = max_bytes
        self.larger = larger or {}
        self.streamed = frozenset(streamed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes, setting = self.larger.get(scope["path"], (self.max_bytes, "MAX_BODY_BYTES"))
        error = f"request body exceeds {max_bytes} bytes ({setting})"
        length = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if length is not None or scope["path"] in self.streamed:
            if length is not None and length.isdigit() and int(length) > max_bytes:
                await send_error(scope, send, 413, error, {"Connection": "close"})
                return
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > max_bytes:
                await send_error(scope, send, 413, error, {"Connection": "close"})
                return
            if not message.get("more_body", False):
                break

        await self.app(scope, replaying(messages, receive), send)


class LoopLag:
    """How late this worker's event loop runs a callback that is due: a task that sleeps
    `interval` and measures by how much it overslept. Every ready callback of every request
    waits about that long each time it awaits, so a lagging loop delays all requests, cached
    ones included, beyond anything the batcher's queue shows (seen in the spike load test)."""

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
    `initial` back there, as a limit left low would refuse the next burst of light traffic (seen
    in the cache load test run right after the spike; raising it on every fast request made
    with little in flight instead let it climb in the middle of the spike). Written here: the
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
    turn the refusals themselves into the overload (seen in `make bench`: 32 clients with no
    think time, one worker's limit cut at start-up, then thousands of refusals a second on its
    event loop kept its admitted requests slow and its limit at the minimum, 87% of requests
    refused at a load the instance answers in full). A first refusal is immediate.
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
        self.per_client = per_client
        self.per_client_setting = per_client_setting
        self.trusted = tuple(trusted)
        self._by_client: dict[str, int] = {}
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
            await send_error(scope, send, 503, "service overloaded, retry later", retry)
            return
        client = self.per_client and self._client(scope)
        if client and self._by_client.get(client, 0) >= self.per_client:
            metrics.RATE_LIMITED.labels(metrics.endpoint_label(scope["path"])).inc()  # a 429, not a shed
            message = (
                f"too many requests in flight from this client, at most {self.per_client} ({self.per_client_setting})"
            )
            await send_error(scope, send, 429, message, {"Retry-After": str(self.retry_after)})
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
        if client:
            self._by_client[client] = self._by_client.get(client, 0) + 1
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send if adaptive is None else send_status)
        finally:
            if adaptive is not None:
                adaptive.sample(time.perf_counter() - start, self.in_flight, overloaded=status == 503)
            self.in_flight -= 1
            if self.occupancy is not None:
                self.occupancy.change(-1)
            if client:
                self._by_client[client] -= 1
                if not self._by_client[client]:
                    del self._by_client[client]

    def _client(self, scope: Scope) -> str:
        peer = scope.get("client")
        forwarded = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-for"), None)
        return client_address(peer[0] if peer else None, forwarded, self.trusted)

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


class RequestContext:
    """A request id on every answer; public requests timed and counted, error answers recorded.

    A plain ASGI middleware: Starlette's `@app.middleware("http")` runs each request through an
    extra task and memory streams, measurable CPU per request (docs/performance.md).
    """

    def __init__(self, app: ASGIApp, public: Sequence[str], on_error: Callable[[str, int], None]) -> None:
        self.app = app
        self.public = tuple(public)
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = random_uuid()
        scope.setdefault("state", {})["request_id"] = rid  # request.state.request_id (errors.py)
        path = scope["path"]
        public = path.startswith(self.public) or path == "/health"
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", rid.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status = 500  # the generic 500 itself is written by errors.py
            raise
        finally:
            if public:
                endpoint = metrics.endpoint_label(path)
                metrics.HTTP_REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - started)
                metrics.HTTP_REQUESTS.labels(endpoint, str(status)).inc()
            if status >= 400:
                self.on_error(path, status)


class JsonErrors:
    """BentoML's own app answers a path no route matches (the mounted app's included) with a
    plain-text 404, and a path whose route takes other methods (the prediction APIs take POST
    only) with a plain-text 405; the contract wants every error as JSON with a request id.
    Added to BentoML's outer app, it rewrites only those answers, keeping their `Allow`: every
    other response passes untouched."""

    REWRITTEN = {404: "not found", 405: "method not allowed"}

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rewriting: dict[str, str] | None = None
        status = 0

        async def send_json(message: Message) -> None:
            nonlocal rewriting, status
            if message["type"] == "http.response.start" and message["status"] in self.REWRITTEN:
                given = dict(message.get("headers", []))
                if given.get(b"content-type", b"").startswith(b"text/plain"):
                    status = message["status"]
                    rewriting = {"Allow": given[b"allow"].decode()} if b"allow" in given else {}
            if rewriting is None:
                await send(message)
                return
            if message["type"] == "http.response.start" or message.get("more_body"):
                return  # sent with the body below, once its length is known
            problem = f"{self.REWRITTEN[status]}: {scope['method']} {scope['path']}"
            await send_error(scope, send, status, problem, rewriting)

        await self.app(scope, receive, send_json)


class ErrorSink(Protocol):
    def record_error(self, endpoint: str, status: int) -> None: ...


class ErrorCounts:
    """Error answers of the public routes, for the analytics error counts: the middleware is
    built with the app at import, the analytics sink in each worker, which hands it in here."""

    def __init__(self, public: Sequence[str]) -> None:
        self.public = tuple(public)
        self.sink: ErrorSink | None = None

    def __call__(self, path: str, status: int) -> None:
        if self.sink is not None and path.startswith(self.public):
            self.sink.record_error(metrics.endpoint_label(path), status)


def api_routes(routes: Sequence[Any]) -> Iterator[APIRoute]:
    """The app's endpoints, in order. BentoML moves the class's routes into a router included in
    the app, which FastAPI keeps as one route holding that router (`original_router`)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from api_routes(included.routes)


def route_paths(routes: Sequence[Any]) -> list[str]:
    """The paths of the app's endpoints (those in its OpenAPI document)."""
    return [route.path for route in api_routes(routes) if route.include_in_schema]
