"""The sentiment service: endpoints and wiring (shared/API.md is the contract).

Public endpoints live on a FastAPI app mounted into the BentoML service, so that errors,
limits and headers follow the contract exactly. Every inference, whether from /predict,
/predict/ab or /batch, goes through the one batchable `infer` API, called through
`self.to_async`, so BentoML's adaptive batcher groups texts from concurrent requests.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
import time
import tomllib
import uuid
from datetime import timedelta
from http import HTTPStatus
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any

import bentoml
from anyio.to_thread import run_sync
from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError

from models import runtime
from service import ab, errors, metrics
from service.config import Settings, get_settings
from service.errors import ApiError
from service.limits import BodySizeLimit, InFlightLimit, InternalOnly, client_address
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
from storage.analytics import PredictionRecord, SqlAnalyticsStore
from storage.cache import PredictionCache, cache_key, make_cache
from storage.ratelimit import Decision, RateLimiter, make_limiter, parse_limit

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

app = FastAPI(title="sentiment", docs_url=None, redoc_url=None, openapi_url=None)
errors.install(app)
app.add_middleware(InFlightLimit, limit=MAX_IN_FLIGHT, paths=PUBLIC_PATHS)
app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)


class InferItem(BaseModel):
    """One text for one model: the unit the adaptive batcher groups."""

    model: str
    text: str


class InferResult(BaseModel):
    label: str
    score: float
    probabilities: dict[str, float]


def _window(value: str) -> timedelta:
    match = re.fullmatch(r"(\d{1,6})([smhd])", value.strip())
    if not match:
        raise ApiError(400, "invalid request: window: expected a number and a unit s, m, h or d, e.g. 15m")
    seconds = int(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
    if seconds > MAX_WINDOW_SECONDS:
        raise ApiError(400, f"invalid request: window: at most {MAX_WINDOW_SECONDS // 86400} days")
    return timedelta(seconds=seconds)


@bentoml.service(
    name="sentiment",
    workers=settings.service_workers,
    # Internal batching calls reuse one client; BentoML replaces it after max_requests
    # while calls are in flight, which reset connections under load (BENTOML_NOTES.md).
    runner_connection={"max_requests": 1_000_000_000, "max_age": 1e9},
    traffic={"timeout": 60},
    envs=[{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "BENTOML_DO_NOT_TRACK", "value": "True"}],
)
@bentoml.asgi_app(app, path="/")
class Sentiment:
    """Sentiment predictions with caching, rate limits, an A/B test and analytics."""

    model_a = bentoml.models.BentoModel(settings.sentiment_model)
    model_b = bentoml.models.BentoModel(settings.ab_model_b)
    to_async: Any  # set by BentoML on each instance: calls through its own batching server

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
        self._stop_watch = threading.Event()
        threading.Thread(target=self._watch, name="metrics-watch", daemon=True).start()

    def _watch(self, interval: float = 5.0) -> None:
        """Keep this worker's gauges current: dependencies, memory, analytics buffer and spill."""
        cache_backend = "redis" if settings.redis_url else "memory"
        limit = metrics.memory_limit_bytes()
        while True:
            try:
                metrics.DEPENDENCY_UP.labels("cache", cache_backend).set(self.cache.status() != "down")
                metrics.DEPENDENCY_UP.labels("database", self.analytics.dialect).set(self.analytics.status() != "down")
                metrics.RESIDENT_MEMORY.set(metrics.resident_memory_bytes())
                metrics.MEMORY_LIMIT.set(limit)
                self.analytics.update_gauges()
            except Exception:  # a gauge is not worth a worker: log and carry on
                log.exception("updating gauges failed")
            if self._stop_watch.wait(interval):
                return

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
    def _close(self) -> None:
        self._stop_watch.set()
        self.analytics.close()

    # --- the one inference path ---------------------------------------------------------

    # max_latency_ms is BentoML's shedding threshold, not a wait: a batch predicted to finish
    # later than this is refused with 503. The fp32 model's p99 at 64 closed-loop clients was
    # 1.3 s here, so 10 s sheds only when a real backlog builds up.
    @bentoml.api(route="/internal/infer", batchable=True, max_batch_size=settings.max_batch_size, max_latency_ms=10_000)
    def infer(self, items: list[InferItem]) -> list[InferResult]:
        """Model outputs for (model, text) items, each model run once per batch."""
        results: list[InferResult | None] = [None] * len(items)
        by_model: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            by_model.setdefault(item.model, []).append(i)
        for tag, idx in by_model.items():
            started = time.perf_counter()
            preds = self.predictors[tag].predict([items[i].text for i in idx])
            metrics.INFERENCE_SECONDS.labels(tag).observe(time.perf_counter() - started)
            metrics.INFERENCE_BATCH_TEXTS.labels(tag).observe(len(idx))
            metrics.INFERRED_TEXTS.labels(tag).inc(len(idx))
            for i, p in zip(idx, preds, strict=True):
                results[i] = InferResult(label=p.label, score=p.score, probabilities=p.probabilities)
        return [r for r in results if r is not None]

    async def _predict(self, texts: list[str], tag: str, endpoint: str, variant: str | None = None):
        """Predictions for `texts` by model `tag`: cache first, the rest through the batcher."""
        started = time.perf_counter()
        keys = [cache_key(tag, t) for t in texts]
        # Redis calls block; off the event loop they cannot stall other requests in an outage.
        found = await run_sync(self.cache.get_many, keys)
        missing = [i for i, hit in enumerate(found) if hit is None]
        if missing:
            items = [InferItem(model=tag, text=texts[i]) for i in missing]
            try:
                outputs = await self.to_async.infer(items)
            except bentoml.exceptions.BentoMLException as exc:
                if exc.error_code == HTTPStatus.SERVICE_UNAVAILABLE:
                    metrics.OVERLOAD_REJECTIONS.labels(endpoint, "batch_queue").inc()
                    raise ApiError(503, "service overloaded, retry later", {"Retry-After": "1"}) from exc
                raise
            fresh = {}
            for i, out in zip(missing, outputs, strict=True):
                value = out if isinstance(out, dict) else out.model_dump()
                found[i] = value
                fresh[keys[i]] = value
            await run_sync(self.cache.set_many, fresh)
        elapsed = time.perf_counter() - started
        latency_ms = round(elapsed * 1000, 2)
        metrics.CACHE_LOOKUPS.labels("hit").inc(len(texts) - len(missing))
        metrics.CACHE_LOOKUPS.labels("miss").inc(len(missing))
        metrics.PREDICTION_SECONDS.labels(endpoint, variant or "none").observe(elapsed)
        cached_idx = set(range(len(texts))) - set(missing)
        predictions = [
            Prediction(
                request_id=str(uuid.uuid4()),
                label=value["label"],
                score=value["score"],
                probabilities=value["probabilities"],
                model=tag,
                cached=i in cached_idx,
                latency_ms=latency_ms,
            )
            for i, value in enumerate(found)
            if value is not None
        ]
        for p in predictions:
            metrics.PREDICTIONS.labels(endpoint, tag, variant or "none", p.label, str(p.cached).lower()).inc()
        self.analytics.record(
            PredictionRecord(
                request_id=p.request_id,
                endpoint=endpoint,
                model=tag,
                label=p.label,
                score=p.score,
                cached=p.cached,
                latency_ms=latency_ms,
                text_sha256=hashlib.sha256(text.encode()).hexdigest(),
                text_length=len(text),
                variant=variant,
                text=text,
            )
            for p, text in zip(predictions, texts, strict=True)
        )
        return predictions

    # --- public endpoints ----------------------------------------------------------------

    async def _limit(self, request: Request, response: Response, scope: str) -> None:
        """Count this request against its client's limit; 429 with the contract's headers over it."""
        limit = self.limits[scope]
        if limit is None:
            return
        peer = request.client.host if request.client else None
        client = client_address(peer, request.headers.get("x-forwarded-for"), settings.trusted_proxies)
        decision: Decision = await run_sync(self.limiter.hit, scope, client, limit)
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
        await self._limit(request, response, "predict")
        [prediction] = await self._predict([body.text], self.tag_a, "/predict")
        return prediction

    @app.post("/predict/ab", response_model=ABPrediction)
    async def predict_ab(self, body: ABRequest, request: Request, response: Response) -> ABPrediction:
        await self._limit(request, response, "predict")
        variant = ab.assign(self.experiment, body.user_id, settings.ab_split)
        tag = self.tag_b if variant == "B" else self.tag_a
        [prediction] = await self._predict([body.text], tag, "/predict/ab", variant)
        return ABPrediction(**prediction.model_dump(), variant=variant, experiment=self.experiment)

    @app.post("/batch", response_model=BatchResponse)
    async def batch(self, body: BatchRequest, request: Request, response: Response) -> BatchResponse:
        await self._limit(request, response, "batch")
        predictions = await self._predict(body.texts, self.tag_a, "/batch")
        cached = sum(p.cached for p in predictions)
        return BatchResponse(predictions=predictions, count=len(predictions), cached_count=cached)

    @app.post("/feedback", response_model=FeedbackResponse)
    async def feedback(self, body: FeedbackRequest) -> FeedbackResponse:
        try:
            await run_sync(self.analytics.record_feedback, str(body.request_id), body.label)
        except SQLAlchemyError as exc:
            log.warning("feedback not stored: %s", exc)
            raise ApiError(503, "analytics database unavailable, retry later", {"Retry-After": "5"}) from exc
        return FeedbackResponse(accepted=True)

    @app.get("/analytics/summary")
    async def analytics_summary(self, request: Request, window: Annotated[str, Query()] = "1h") -> dict:
        self._admin(request)
        return await run_sync(self.analytics.summary, _window(window))

    @app.get("/analytics/ab")
    async def analytics_ab(self, request: Request, window: Annotated[str, Query()] = "1h") -> dict:
        self._admin(request)
        report = await run_sync(self.analytics.ab_report, _window(window))
        return {"experiment": self.experiment, "split": settings.ab_split, **report}

    @app.get("/health")
    async def health(self) -> JSONResponse:
        cache = await run_sync(self.cache.status)
        database = await run_sync(self.analytics.status)
        serving = bool(self.predictors)
        degraded = "down" in (cache, database)
        body = {
            "status": "ok" if serving and not degraded else "degraded",
            "model": {
                "A": self.tag_a,
                "B": self.tag_b,
                "runtimes": {tag: p.runtime for tag, p in self.predictors.items()},
                "threads": settings.threads_per_worker,
            },
            "cache": cache,
            "database": database,
            "rate_limiter": await run_sync(self.limiter.status),
            "version": VERSION,
        }
        return JSONResponse(body, status_code=200 if serving else 503)


Sentiment.add_asgi_middleware(InternalOnly)  # type: ignore[attr-defined]  # a bentoml Service


@app.middleware("http")
async def _request_context(request: Request, call_next):
    """A request id on every response; public requests timed and counted, errors recorded."""
    rid = errors.request_id(request)
    path = request.url.path
    public = path.startswith(PUBLIC_PATHS) or path == "/health"
    endpoint = metrics.endpoint_label(path)
    started = time.perf_counter()
    try:
        response = await call_next(request)
    except Exception:
        _count_error(path, 500)  # the generic 500 itself is written by errors.py
        if public:
            metrics.HTTP_REQUESTS.labels(endpoint, "500").inc()
        raise
    if public:
        metrics.HTTP_REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - started)
        metrics.HTTP_REQUESTS.labels(endpoint, str(response.status_code)).inc()
    response.headers["X-Request-ID"] = rid
    if response.status_code >= 400:
        _count_error(path, response.status_code)
    return response


def _count_error(path: str, status: int) -> None:
    if not path.startswith(PUBLIC_PATHS):
        return
    try:
        service = bentoml.get_current_service()
    except Exception:  # during shutdown there is no service left to count in
        return
    if service is not None:
        service.analytics.record_error(path, status)
