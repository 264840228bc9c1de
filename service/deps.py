"""FastAPI dependencies of the endpoints: the service instance, per-client rate limits and the
analytics key. Imports config, guards, metrics and storage's limiter; service.py uses them."""

from __future__ import annotations

import functools
import hmac
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import bentoml
from fastapi import Request, Response
from limits import RateLimitItem

from service import metrics
from service.config import get_settings
from service.errors import ApiError
from service.guards import client_address
from storage.ratelimit import RateLimiter


async def current_service() -> Any:
    """BentoML hands the endpoints their `self` through Depends(get_current_service), a plain
    function that FastAPI runs in its thread pool: a thread hand-off on every request. The same
    lookup as a coroutine runs on the event loop (docs/performance.md)."""
    return bentoml.get_current_service()


class ClientLimits:
    """Per-client limits by scope ("predict", "batch"), on a limiter shared by every worker."""

    def __init__(self, limiter: RateLimiter, limits: dict[str, RateLimitItem | None], trusted: Sequence[str]) -> None:
        self.limiter = limiter
        self.limits = limits
        self.trusted = tuple(trusted)

    async def check(self, request: Request, response: Response, scope: str) -> None:
        """Count this request against its client's limit; 429 with the contract's headers over it."""
        limit = self.limits[scope]
        if limit is None:
            return
        peer = request.client.host if request.client else None
        client = client_address(peer, request.headers.get("x-forwarded-for"), self.trusted)
        decision = await self.limiter.hit(scope, client, limit)
        if not decision.allowed:
            metrics.RATE_LIMITED.labels(metrics.endpoint_label(request.url.path)).inc()
            raise ApiError(429, f"rate limit exceeded: {limit} per client", decision.headers())
        response.headers.update(decision.headers())


Gate = Callable[[], Awaitable[None]]


def rate_limit(scope: str) -> Callable[[Request, Response], Coroutine[Any, Any, Gate]]:
    """A dependency giving the endpoint its rate-limit check to call: the prediction path runs
    it beside the cache lookup, both being round trips to Redis (docs/performance.md). A request
    refused before the endpoint runs (a bad body) is never counted."""

    async def gate(request: Request, response: Response) -> Gate:
        service = bentoml.get_current_service()
        return functools.partial(service.client_limits.check, request, response, scope)

    return gate


def require_admin(request: Request) -> None:
    """401 unless the request carries `Authorization: Bearer <ADMIN_API_KEY>` (when one is set)."""
    key = get_settings().admin_api_key
    if key is None:
        return
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {key.get_secret_value()}".encode()):
        raise ApiError(401, "analytics need Authorization: Bearer <ADMIN_API_KEY>", {"WWW-Authenticate": "Bearer"})
