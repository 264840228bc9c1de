"""What the endpoints depend on: the service instance and the analytics key as FastAPI
dependencies, and the per-client rate limits. Imports config, guards, metrics and storage's limiter."""

from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import bentoml
from fastapi import Depends, Request, Response
from limits import RateLimitItem

from service import metrics
from service.config import get_settings
from service.errors import ApiError
from service.guards import api_routes, client_address, trusted_networks
from storage.ratelimit import RateLimiter


async def current_service() -> Any:
    """BentoML hands the endpoints their `self` through Depends(get_current_service), a plain
    function that FastAPI runs in its thread pool: a thread hand-off on every request. The same
    lookup as a coroutine runs on the event loop (docs/performance.md)."""
    return bentoml.get_current_service()


def self_on_the_loop(routes: Sequence[Any]) -> int:
    """Point the class views' `self` dependency at `current_service`, in the routes' own
    signatures (those BentoML moved into an included router too, from whose signatures FastAPI
    builds the routes it serves, at the first request); the number of endpoints rewired.

    Not through `app.dependency_overrides`: while any override is set, FastAPI rebuilds the
    dependency tree of every dependency of every request (`get_dependant`, signature analysis
    included): 6.7% of a worker's busy time on cache hits (py-spy, docs/performance.md)."""
    rewired = 0
    for route in api_routes(routes):
        endpoint: Any = route.endpoint
        signature = inspect.signature(endpoint)
        params = list(signature.parameters.values())
        if params and getattr(params[0].default, "dependency", None) is bentoml.get_current_service:
            params[0] = params[0].replace(default=Depends(current_service))
            endpoint.__signature__ = signature.replace(parameters=params)
            for dependency in route.dependant.dependencies:  # the route as already analysed
                if dependency.call is bentoml.get_current_service:
                    dependency.call = current_service
            rewired += 1
    return rewired


Gate = Callable[[], Awaitable[None]]


class ClientLimits:
    """Per-client limits by scope ("predict", "batch"), on a limiter shared by every worker.

    Not a FastAPI dependency: resolved as one, the check cost 8% of the throughput of uncached
    predictions at 32 clients (make bench, 5 rounds beside the version before it; as a plain
    callable, the same throughput as that version). The endpoints
    hand `gate(...)` to the prediction path, which runs it beside the cache lookup, both being
    round trips to Redis (docs/performance.md)."""

    def __init__(
        self,
        limiter: RateLimiter,
        limits: dict[str, RateLimitItem | None],
        trusted: Sequence[str],
        pace_s: float = 0.1,
    ) -> None:
        """`pace_s`: a connection refused again before its Retry-After gets the 429 after this
        long, as guards.InFlightLimit paces its 503s: a client polling back to back at its limit
        otherwise spends the worker's event loop on refusals (make abuse, status poll flood)."""
        self.limiter = limiter
        self.limits = limits
        self.trusted = trusted_networks(trusted)
        self.pace_s = pace_s
        self._refused_until: dict[tuple[Any, ...], float] = {}  # connection -> its Retry-After's end

    def identity(self, request: Request) -> str:
        """The client a limit counts (guards.client_address)."""
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
