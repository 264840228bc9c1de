"""The sentiment service: endpoints and wiring (shared/API.md is the contract).

Public endpoints live on a FastAPI app mounted into the BentoML service, so that errors,
limits and headers follow the contract exactly. Every inference, whether from /predict,
/predict/ab or /batch, goes through one in-process batcher per worker (service/batching.py),
which groups texts from concurrent requests into one forward call off the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import re
import tomllib
from datetime import timedelta
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any

import bentoml
from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from models import runtime
from service import ab, errors, metrics
from service.batching import Batcher, BatchStats
from service.config import Settings, get_settings
from service.errors import ApiError
from service.limits import BodySizeLimit, InFlightLimit, JsonNotFound, LoopLag, RequestContext, client_address
from service.predictions import Predictions
from service.schemas import (
    ABPrediction,
    ABRequest,
    BatchRequest,
    BatchResponse,
    FeedbackRequest,
    FeedbackResponse,
    Prediction,
    PredictRequest,
)
from storage import migrate
from storage.analytics import SqlAnalyticsStore
from storage.cache import PredictionCache, make_cache
from storage.ratelimit import RateLimiter, make_limiter, parse_limit

log = logging.getLogger("sentiment")
settings: Settings = get_settings()


def _version() -> str:
    """The project's version: installed metadata, or pyproject.toml inside a Bento."""
    try:
        return package_version("sentiment-service")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])


VERSION = _version()
PUBLIC_PATHS = ("/predict", "/batch", "/feedback", "/analytics")
# Per worker. Beyond this many public requests in flight a worker answers 503 at once
# rather than queueing work it cannot finish in time.
MAX_IN_FLIGHT = 512
MAX_WINDOW_SECONDS = 3650 * 86400
# Routes BentoML's own request metrics and tracing leave alone (prefixes).
BENTOML_SKIP = [*PUBLIC_PATHS, "/health"]


def _count_error(path: str, status: int) -> None:
    """An error answer of a public route, for the analytics error counts."""
    if not path.startswith(PUBLIC_PATHS):
        return
    try:
        service = bentoml.get_current_service()
    except Exception:  # during shutdown there is no service left to count in
        return
    if service is not None:
        service.analytics.record_error(metrics.endpoint_label(path), status)


app = FastAPI(title="sentiment", docs_url=None, redoc_url=None, openapi_url=None)
errors.install(app)


async def _current_service() -> Any:
    return bentoml.get_current_service()


# BentoML hands the endpoints their `self` through Depends(get_current_service), a plain function
# that FastAPI runs in its thread pool: a thread hand-off on every request. The same lookup as a
# coroutine runs on the event loop (README, Performance).
app.dependency_overrides[bentoml.get_current_service] = _current_service
# A request passes the event loop about four times (its body, the cache lookup, the model's
# answer, the cache fill), each after the loop's lag: past a quarter of the queue-delay budget
# of lag, new requests are refused at the door (README, Performance: the spike load test).
LOOP_LAG = LoopLag()
app.add_middleware(
    InFlightLimit,
    limit=MAX_IN_FLIGHT,
    paths=PUBLIC_PATHS,
    lag=LOOP_LAG,
    max_lag_s=settings.max_queue_delay_ms / 1000 / 4,
)
app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
app.add_middleware(RequestContext, public=PUBLIC_PATHS, on_error=_count_error)


def _window(value: str) -> timedelta:
    match = re.fullmatch(r"(\d{1,6})([smhd])", value.strip())
    if not match:
        raise ApiError(400, "invalid request: window: expected a number and a unit s, m, h or d, e.g. 15m")
    seconds = int(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
    if seconds > MAX_WINDOW_SECONDS:
        raise ApiError(400, f"invalid request: window: at most {MAX_WINDOW_SECONDS // 86400} days")
    return timedelta(seconds=seconds)


def _observe_batch(stats: BatchStats) -> None:
    metrics.INFERENCE_SECONDS.labels(stats.model).observe(stats.seconds)
    metrics.INFERENCE_BATCH_TEXTS.labels(stats.model).observe(stats.texts)
    metrics.INFERRED_TEXTS.labels(stats.model).inc(stats.texts)
    metrics.INFERENCE_CPU_SECONDS.labels(stats.model).inc(stats.cpu_seconds)


def _observe_waits(waits: list[float]) -> None:
    for wait in waits:
        metrics.QUEUE_WAIT_SECONDS.observe(wait)


@bentoml.service(
    name="sentiment",
    workers=settings.service_workers,
    traffic={"timeout": 60},
    # Per-request work of BentoML's own middlewares, measured in CPU per request (README,
    # Performance): its access log line (ACCESS_LOG=true turns it back on), its request metrics
    # (the public routes have their own, sentiment_http_*) and its OpenTelemetry span (unsampled
    # unless tracing is configured; set tracing.excluded_urls in a BentoML config to trace them).
    logging={"access": {"enabled": settings.access_log, "skip_paths": [] if settings.access_log else BENTOML_SKIP}},
    tracing={"excluded_urls": BENTOML_SKIP},
    envs=[{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "BENTOML_DO_NOT_TRACK", "value": "True"}],
)
@bentoml.asgi_app(app, path="/")
class Sentiment:
    """Sentiment predictions with caching, rate limits, an A/B test and analytics."""

    model_a = bentoml.models.BentoModel(settings.sentiment_model)
    model_b = bentoml.models.BentoModel(settings.ab_model_b)

    def __init__(self) -> None:
        threads = settings.threads_per_worker
        self.predictors: dict[str, runtime.Predictor] = {}
        for stored in (self.model_a, self.model_b):
            tag = str(stored.tag)
            self.predictors[tag] = runtime.load_dir(Path(stored.path), tag, threads)
        self.tag_a, self.tag_b = str(self.model_a.tag), str(self.model_b.tag)
        self.experiment = f"{self.model_a.tag.name}-vs-{self.model_b.tag.name}"
        self.cache: PredictionCache = make_cache(settings.redis_url, settings.cache_ttl_seconds)
        self.limiter: RateLimiter = make_limiter(settings.redis_url)
        self.limits = {
            "predict": parse_limit(settings.rate_limit_predict),
            "batch": parse_limit(settings.rate_limit_batch),
        }
        self.analytics = SqlAnalyticsStore(
            settings.database_url, store_text=settings.store_text, spill_dir=settings.spill_dir
        )
        self.analytics.start()
        self.batcher: Batcher[runtime.Prediction] = Batcher(
            lambda tag, texts: self.predictors[tag].predict(texts),
            max_batch=settings.batch_max_texts,
            max_wait_s=settings.batch_wait_ms / 1000,
            max_delay_s=settings.max_queue_delay_ms / 1000,
            on_batch=_observe_batch,
            on_start=_observe_waits,
            threads=settings.inference_threads_per_worker,
        )
        self.predictions = Predictions(self.cache, self.batcher, self.analytics)
        self.database_status = self.analytics.dialect if self.analytics.dialect == "sqlite" else "ok"
        self._watcher: asyncio.Task[None] | None = None

    @bentoml.on_startup
    async def _start_watch(self) -> None:
        # Half a million objects live from start-up on (torch, transformers, the models): one
        # full collection of them stalled the worker for about 0.5 s, a half-second p99 on every
        # endpoint. Frozen, they are never scanned again; request garbage is collected as usual.
        gc.collect()
        gc.freeze()
        await self._refresh_gauges()
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="metrics-watch")
        LOOP_LAG.start()

    async def _refresh_gauges(self) -> None:
        """This worker's gauges: dependencies, memory, analytics buffer and spill."""
        cache_backend = "redis" if settings.redis_url else "memory"
        # The database check and the spill folder's size are blocking calls: off the loop.
        self.database_status = await asyncio.to_thread(self.analytics.status)
        metrics.DEPENDENCY_UP.labels("cache", cache_backend).set(await self.cache.status() != "down")
        metrics.DEPENDENCY_UP.labels("database", self.analytics.dialect).set(self.database_status != "down")
        metrics.RESIDENT_MEMORY.set(metrics.resident_memory_bytes())
        metrics.MEMORY_LIMIT.set(metrics.memory_limit_bytes())
        await asyncio.to_thread(self.analytics.update_gauges)

    async def _watch(self, interval: float = 5.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self._refresh_gauges()
            except Exception:  # a gauge is not worth a worker: log and carry on
                log.exception("updating gauges failed")

    @bentoml.on_deployment
    def _migrate() -> None:
        """Bring the analytics schema up to date, once, before any worker starts: two workers
        running DDL at start-up race (BENTOML_NOTES.md). A database that is down now does not
        stop the service: rows are buffered and spilled until it is back and migrated
        (`make migrate`)."""
        try:
            migrate.upgrade(settings.database_url)
        except Exception as exc:
            log.error("analytics migrations not applied (%s); predictions are buffered meanwhile", exc)

    @bentoml.on_shutdown
    async def _close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        LOOP_LAG.stop()
        await asyncio.to_thread(self.batcher.close)
        await asyncio.to_thread(self.analytics.close)

    # --- public endpoints ----------------------------------------------------------------

    async def _limit(self, request: Request, response: Response, scope: str) -> None:
        """Count this request against its client's limit; 429 with the contract's headers over it."""
        limit = self.limits[scope]
        if limit is None:
            return
        peer = request.client.host if request.client else None
        client = client_address(peer, request.headers.get("x-forwarded-for"), settings.trusted_proxies)
        decision = await self.limiter.hit(scope, client, limit)
        if not decision.allowed:
            metrics.RATE_LIMITED.labels(metrics.endpoint_label(request.url.path)).inc()
            raise ApiError(429, f"rate limit exceeded: {limit} per client", decision.headers())
        response.headers.update(decision.headers())

    def _admin(self, request: Request) -> None:
        key = settings.admin_api_key
        if key is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {key.get_secret_value()}".encode()):
            raise ApiError(401, "analytics need Authorization: Bearer <ADMIN_API_KEY>", {"WWW-Authenticate": "Bearer"})

    @app.post("/predict", response_model=Prediction)
    async def predict(self, body: PredictRequest, request: Request, response: Response) -> Prediction:
        limit = self._limit(request, response, "predict")
        [prediction] = await self.predictions.predict([body.text], self.tag_a, "/predict", gate=limit)
        return prediction

    @app.post("/predict/ab", response_model=ABPrediction)
    async def predict_ab(self, body: ABRequest, request: Request, response: Response) -> ABPrediction:
        limit = self._limit(request, response, "predict")
        variant = ab.assign(self.experiment, body.user_id, settings.ab_split)
        tag = self.tag_b if variant == "B" else self.tag_a
        [prediction] = await self.predictions.predict([body.text], tag, "/predict/ab", variant, gate=limit)
        return ABPrediction(**prediction.model_dump(), variant=variant, experiment=self.experiment)

    @app.post("/batch", response_model=BatchResponse)
    async def batch(self, body: BatchRequest, request: Request, response: Response) -> BatchResponse:
        limit = self._limit(request, response, "batch")
        predictions = await self.predictions.predict(body.texts, self.tag_a, "/batch", gate=limit)
        cached = sum(p.cached for p in predictions)
        return BatchResponse(predictions=predictions, count=len(predictions), cached_count=cached)

    @app.post("/feedback", response_model=FeedbackResponse)
    async def feedback(self, body: FeedbackRequest) -> FeedbackResponse:
        try:
            await asyncio.to_thread(self.analytics.record_feedback, str(body.request_id), body.label)
        except SQLAlchemyError as exc:
            log.warning("feedback not stored: %s", exc)
            raise ApiError(503, "analytics database unavailable, retry later", {"Retry-After": "5"}) from exc
        return FeedbackResponse(accepted=True)

    @app.get("/analytics/summary")
    async def analytics_summary(self, request: Request, window: Annotated[str, Query()] = "1h") -> dict:
        self._admin(request)
        return await asyncio.to_thread(self.analytics.summary, _window(window))

    @app.get("/analytics/ab")
    async def analytics_ab(self, request: Request, window: Annotated[str, Query()] = "1h") -> dict:
        self._admin(request)
        report = await asyncio.to_thread(self.analytics.ab_report, _window(window))
        return {"experiment": self.experiment, "split": settings.ab_split, **report}

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """Redis is asked (one PING on the event loop); the database's state is the watcher's
        (every 5 s) or the analytics writer's last failure, so a health probe costs no
        database round trip and no thread."""
        cache = await self.cache.status()
        database = "down" if not self.analytics.healthy else self.database_status
        serving = bool(self.predictors)
        degraded = "down" in (cache, database)
        body = {
            "status": "ok" if serving and not degraded else "degraded",
            "model": {
                "A": self.tag_a,
                "B": self.tag_b,
                "runtimes": {tag: p.runtime for tag, p in self.predictors.items()},
                "threads": settings.threads_per_worker,
                "inference_threads": settings.inference_threads_per_worker,
            },
            "cache": cache,
            "database": database,
            "rate_limiter": await self.limiter.status(),
            "version": VERSION,
        }
        return JSONResponse(body, status_code=200 if serving else 503)


# On BentoML's outer app: unknown paths never reach the FastAPI app above.
Sentiment.add_asgi_middleware(JsonNotFound)  # type: ignore[attr-defined]  # a bentoml.Service
