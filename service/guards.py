"""The guards around the service, in the order a request meets them, and what they keep per
worker. Outermost first: the request's id, timing and error counts (intake.RequestContext);
JSON for the 404s and 405s of BentoML's own app (workarounds.JsonErrors); the body's size
(intake.BodySizeLimit, 413); the in-flight limits of the prediction endpoints and of /jobs
(overload.InFlightLimit, 503, and 429 per client for /jobs); then the short path, which answers
the prediction APIs (fastpath.ShortPath). Each refusal is the contract's JSON error."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel

from service import fastpath, metrics, workarounds
from service.batching import Batcher
from service.clients import trusted_networks
from service.config import Settings
from service.intake import BodySizeLimit, ErrorCounts, RequestContext
from service.overload import AdaptiveLimit, InFlightLimit, LoopLag, Occupancy

# Per worker. Beyond this many public requests in flight a worker answers 503 at once rather
# than queueing work it cannot finish in time.
MAX_IN_FLIGHT = 512


class Guards:
    """One worker's guards: their state, made when the service module is imported (the service
    reads it), and the guards themselves, installed once the service's routes exist."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Past a quarter of the queue-delay budget of event loop lag, new requests are refused
        # at the door: each waits out that lag about four times (docs/performance.md).
        self.loop_lag = LoopLag()
        # Under overload a worker takes only as many requests at once as it answers within the
        # budget: the rest are refused at the door rather than all waiting for the CPU.
        self.concurrency = AdaptiveLimit(settings.max_queue_delay_ms / 1000, maximum=MAX_IN_FLIGHT)
        # The requests in flight over time: the in-flight share of the saturation gauge.
        self.occupancy = Occupancy()
        # Error answers of the public routes, for the analytics (each worker hands in its sink).
        self.errors = ErrorCounts()
        # The routes BentoML's access log, request metrics and tracing leave alone (prefixes),
        # filled by `install`: BentoML reads its config when it serves, after the import.
        self.bentoml_skip: list[str] = []
        self.public_paths: tuple[str, ...] = ()
        self.self_dependencies = 0

    def saturation(self, batcher: Batcher[Any]) -> Callable[[], dict[str, float]]:
        """How close the worker is to shedding, by signal (metrics.SATURATION)."""
        budget_s = self.settings.max_queue_delay_ms / 1000
        return lambda: {
            "in_flight": self.occupancy.mean() / self.concurrency.limit,
            "queue_delay": batcher.mean_wait() / budget_s,
        }

    def install(
        self, service: Any, app: Any, short_path: Mapping[str, tuple[type[BaseModel], fastpath.Handler]]
    ) -> None:
        """Guard every route of `service` and of its mounted `app`; the public ones (all but
        /health) are timed, rate limited and their errors counted. `short_path`: the APIs the
        short path answers ({API name: (body model, handler)})."""
        self.self_dependencies = workarounds.self_on_the_loop(app.routes)
        apis = tuple(api.route for api in service.apis.values())
        self.public_paths = (*apis, *(p for p in workarounds.route_paths(app.routes) if p != "/health"))
        metrics.register_endpoints([*self.public_paths, "/health"], guarded=self.public_paths)
        self.bentoml_skip.extend(metrics.ENDPOINTS)
        self.errors.public = self.public_paths
        routes = fastpath.routes_of(service, app, short_path)
        for guard, options in self.chain(routes):
            service.add_asgi_middleware(guard, **options)

    def chain(self, short_path: Mapping[str, fastpath.Route]) -> list[tuple[type, dict[str, Any]]]:
        """The guards, outermost first, with their options."""
        settings, public = self.settings, self.public_paths
        # /jobs requests have a budget of their own, and at most a few per client: a slow upload
        # or a results reader that stops reading holds its slot for up to its timeout, and must
        # not take the prediction endpoints' (docs/api.md, Limits).
        jobs = tuple(p for p in public if p.startswith("/jobs"))
        return [
            (RequestContext, {"public": public, "on_error": self.errors}),
            (workarounds.JsonErrors, {}),
            (
                BodySizeLimit,
                {
                    "max_bytes": settings.max_body_bytes,
                    "larger": {"/jobs": (settings.max_job_body_bytes, "MAX_JOB_BODY_BYTES")},
                    "streamed": ("/jobs",),
                },
            ),
            (
                InFlightLimit,
                {
                    "limit": MAX_IN_FLIGHT,
                    "paths": tuple(p for p in public if p not in jobs),
                    "lag": self.loop_lag,
                    "max_lag_s": settings.max_queue_delay_ms / 4000,
                    "adaptive": self.concurrency,
                    "sampled": ("/predict", "/batch"),
                    "occupancy": self.occupancy,
                },
            ),
            (
                InFlightLimit,
                {
                    "limit": settings.max_job_requests_in_flight,
                    "paths": ("/jobs",),
                    "per_client": settings.job_requests_per_client,
                    "per_client_setting": "JOB_REQUESTS_PER_CLIENT",
                    "trusted": trusted_networks(settings.trusted_proxies),
                },
            ),
            (fastpath.ShortPath, {"routes": short_path}),
        ]
