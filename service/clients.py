"""Who a request comes from, and the answers that depend on it: the per-client rate limits
and in-flight slots (429), the admin key (401), a job token's holder.

Imports config, errors, metrics, service.jobs (the token hash) and storage's limiter."""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import Request, Response
from limits import RateLimitItem
from starlette.types import Scope

from service import metrics
from service.config import get_settings
from service.errors import ApiError, error_response
from service.job_uploads import token_hash
from storage.ratelimit import RateLimiter

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Gate = Callable[[], Awaitable[None]]


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


def scope_client(scope: Scope, trusted: Sequence[Network]) -> str:
    """client_address of an ASGI request."""
    peer = scope.get("client")
    forwarded = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-for"), None)
    return client_address(peer[0] if peer else None, forwarded, trusted)


class ClientSlots:
    """At most `per_client` requests of one client in flight at once, 429 beyond (`setting`
    names the limit): a guard's count, on one event loop (overload.InFlightLimit's)."""

    def __init__(self, per_client: int, setting: str, trusted: Sequence[Network], retry_after: int = 1) -> None:
        self.per_client = per_client
        self.setting = setting
        self.trusted = tuple(trusted)
        self.retry_after = retry_after
        self._by_client: dict[str, int] = {}

    def full(self, client: str) -> bool:
        return self._by_client.get(client, 0) >= self.per_client

    def take(self, client: str) -> None:
        self._by_client[client] = self._by_client.get(client, 0) + 1

    def give_back(self, client: str) -> None:
        self._by_client[client] -= 1
        if not self._by_client[client]:
            del self._by_client[client]

    def refusal(self, scope: Scope) -> Response:
        metrics.RATE_LIMITED.labels(metrics.endpoint_label(scope["path"])).inc()  # a 429, not a shed
        message = f"too many requests in flight from this client, at most {self.per_client} ({self.setting})"
        return error_response(scope, 429, message, {"Retry-After": str(self.retry_after)})


class ClientLimits:
    """Per-client limits by scope ("predict", "batch"), on a limiter shared by every worker.

    Not a FastAPI dependency: resolved as one, it cost 8% of the throughput of uncached
    predictions (docs/performance.md). The endpoints hand `gate(...)` to the prediction path,
    which runs it beside the cache lookup, both being round trips to Redis."""

    def __init__(
        self,
        limiter: RateLimiter,
        limits: dict[str, RateLimitItem | None],
        trusted: Sequence[str],
        pace_s: float = 0.1,
    ) -> None:
        """`pace_s`: a connection refused again before its Retry-After gets the 429 after this
        long, as overload.InFlightLimit paces its 503s (docs/decisions.md, "Paced refusals")."""
        self.limiter = limiter
        self.limits = limits
        self.trusted = trusted_networks(trusted)
        self.pace_s = pace_s
        self._refused_until: dict[tuple[Any, ...], float] = {}  # connection -> its Retry-After's end

    def identity(self, request: Request) -> str:
        """The client a limit counts (client_address)."""
        peer = request.client.host if request.client else None
        return client_address(peer, request.headers.get("x-forwarded-for"), self.trusted)

    async def check(self, request: Request, response: Response, scope: str) -> None:
        """Count this request against its client's limit; 429 with the contract's headers over it."""
        limit = self.limits[scope]
        if limit is None:
            return
        client = self.identity(request)
        decision = await self.limiter.hit(scope, client, limit)
        if not decision.allowed:
            metrics.RATE_LIMITED.labels(metrics.endpoint_label(request.url.path)).inc()
            headers = decision.headers()
            await self._pace(request, float(headers.get("Retry-After", 1)))
            raise ApiError(429, f"rate limit exceeded: {limit} per client", headers)
        response.headers.update(decision.headers())

    async def _pace(self, request: Request, retry_after: float) -> None:
        connection = tuple(request.scope.get("client") or ())
        if not connection:
            return
        now = time.monotonic()
        if len(self._refused_until) >= 10_000:  # connections gone for good: forgotten
            self._refused_until.clear()
        back_too_soon = now < self._refused_until.get(connection, 0.0)
        self._refused_until[connection] = now + retry_after
        if back_too_soon:
            await asyncio.sleep(self.pace_s)

    def gate(self, request: Request, response: Response, scope: str) -> Gate:
        """The check for this request, to run when the prediction path is ready for it."""
        return functools.partial(self.check, request, response, scope)


def is_admin_key(given: str) -> bool:
    """Whether `given` is ADMIN_API_KEY (never, when none is set)."""
    key = get_settings().admin_api_key
    return bool(given) and key is not None and hmac.compare_digest(given.encode(), key.get_secret_value().encode())


async def require_admin(request: Request) -> None:
    """401 unless the request carries `Authorization: Bearer <ADMIN_API_KEY>` (when one is set)."""
    key = get_settings().admin_api_key
    if key is None:
        return
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {key.get_secret_value()}".encode()):
        raise ApiError(401, "analytics need Authorization: Bearer <ADMIN_API_KEY>", {"WWW-Authenticate": "Bearer"})


def job_token(request: Request) -> str | None:
    """The hash of the job token the request carries (`Authorization: Bearer`); None for the
    admin key, which reaches every job. No token: a hash no job has."""
    given = request.headers.get("authorization", "")
    token = given[7:].strip() if given[:7].lower() == "bearer " else ""
    if is_admin_key(token):
        return None
    return token_hash(token)
