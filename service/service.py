"""The sentiment service: its endpoints and how they are wired (docs/api.md is the contract).

Read top to bottom: the FastAPI app and its guards, then the BentoML service holding one
worker's parts, then the endpoints. Every inference, from /predict, /predict/ab or /batch,
goes through the prediction path (predictions.py): the cache, then one in-process batcher per
worker (batching.py) that groups concurrent requests' texts into one forward call off the
event loop, then one analytics row per answer (storage/analytics).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import bentoml
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from models import runtime
from service import ab, deps, errors, fastpath, metrics, schemas
from service.activity import Activity
from service.config import CPUS, Settings, get_settings, project_version
from service.database import DatabaseCalls
from service.errors import ApiError
from service.guards import (
    AdaptiveLimit,
    BodySizeLimit,
    ErrorCounts,
    InFlightLimit,
    JsonErrors,
    LoopLag,
    Occupancy,
    RequestContext,
    cap_send_buffers,
    route_paths,
    trusted_networks,
)
from service.job_results import ResultsStream, results_ndjson
from service.job_uploads import JobBody, new_token, read_job_body, token_hash
from service.jobs import JobRunner
from service.predictions import Predictions, make_batcher
from service.request_ids import RequestIds, load_key
from storage import migrate
from storage.analytics import AnalyticsStore, SqlAnalyticsStore
from storage.cache import make_cache
from storage.db import make_engine
from storage.jobs import JobQueue, QuotaExceeded, Quotas
from storage.ratelimit import make_limiter, parse_limit

log = logging.getLogger("sentiment")
settings: Settings = get_settings()
VERSION = project_version()
# Per worker. Beyond this many public requests in flight a worker answers 503 at once
# rather than queueing work it cannot finish in time.
MAX_IN_FLIGHT = 512
# Job results sent per database read; a refused submission's Retry-After (a job's chunks take
# seconds to minutes, a retry sooner would find the same queue).
RESULTS_PAGE = 250  # about a millisecond to read and encode
JOB_RETRY_AFTER_S = 30
# An API method's work: (validated body, the request or None, a carrier of answer headers or None).
Handler = Callable[[Any, Request | None, Any], Awaitable[Any]]

app = FastAPI(title="sentiment", docs_url=None, redoc_url=None, openapi_url=None)
errors.install(app)
Admin = [Depends(deps.require_admin)]
# The routes BentoML's own access log, request metrics and tracing leave alone (prefixes):
# filled from the app's routes at the bottom. BentoML reads its config when it serves, after
# this module is imported, so it sees the filled list.
BENTOML_SKIP: list[str] = []


@bentoml.service(
    name="sentiment",
    workers=settings.service_workers,
    traffic={"timeout": 60},
    # Per-request work of BentoML's own middlewares, measured in CPU per request (docs/performance.md):
    # its access log line (ACCESS_LOG=true turns it back on), its request metrics (the public
    # routes have their own, sentiment_http_*) and its OpenTelemetry span (unsampled unless
    # tracing is configured; set tracing.excluded_urls in a BentoML config to trace them).
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
        self.tag_a, self.tag_b = str(self.model_a.tag), str(self.model_b.tag)
        self.experiment = f"{self.model_a.tag.name}-vs-{self.model_b.tag.name}"
        self.predictors = {
            str(m.tag): runtime.load_dir(Path(m.path), str(m.tag), settings.threads_per_worker)
            for m in (self.model_a, self.model_b)
        }
        # Before the first request: requests slowed by a fresh session's first calls would cut
        # the adaptive limit (guards.AdaptiveLimit) at start-up, under load.
        for predictor in self.predictors.values():
            runtime.warm_up(predictor, settings.batch_max_texts)
        # Without Redis: one SQLite file of the instance's, shared by its workers (storage/local.py).
        local = Path(settings.spill_dir) / "embedded.sqlite"
        self.cache = make_cache(settings.redis_url, settings.cache_ttl_seconds, local)
        predict_limit = parse_limit(settings.rate_limit_predict)
        self.client_limits = deps.ClientLimits(
            make_limiter(settings.redis_url, local),
            # feedback is limited as /predict, in a window of its own
            {
                "predict": predict_limit,
                "feedback": predict_limit,
                "batch": parse_limit(settings.rate_limit_batch),
                "jobs": parse_limit(settings.rate_limit_jobs),
                "job_reads": parse_limit(settings.rate_limit_job_reads),
            },
            settings.trusted_proxies,
        )
        self.analytics: AnalyticsStore = SqlAnalyticsStore(
            settings.database_url,
            store_text=settings.store_text,
            spill_dir=settings.spill_dir,
            spill_max_bytes=settings.spill_max_bytes,
            pool=(settings.database_pool_size, settings.database_max_overflow),
        )
        self.analytics.start()
        ERRORS.sink = self.analytics
        self.batcher = make_batcher(lambda tag, texts: self.predictors[tag].predict(texts), settings)
        admin_key = settings.admin_api_key.get_secret_value() if settings.admin_api_key else None
        secret = settings.request_id_key.get_secret_value() if settings.request_id_key else None
        self.request_ids = RequestIds(load_key(secret, admin_key, Path(settings.spill_dir) / "request-id.key"))
        self.predictions = Predictions(
            self.cache, self.batcher, self.analytics, self.request_ids.new, Activity(Path(settings.spill_dir))
        )
        self.database = DatabaseCalls()
        self.gauges = metrics.GaugeWatcher(
            self.cache,
            self.client_limits.limiter,
            self.analytics,
            self.database,
            concurrency_limit=lambda: CONCURRENCY.limit,
            saturation=lambda: {
                "in_flight": OCCUPANCY.mean() / CONCURRENCY.limit,
                "queue_delay": self.batcher.mean_wait() / (settings.max_queue_delay_ms / 1000),
            },
        )
        self.jobs = JobQueue(
            make_engine(settings.database_url, settings.database_pool_size, settings.database_max_overflow),
            timedelta(seconds=settings.job_result_ttl_seconds),
        )
        self.job_quotas = Quotas(
            settings.max_active_jobs_per_client, settings.max_queued_texts_per_client, settings.max_queued_texts
        )
        self.job_runner = JobRunner(
            self.jobs,
            self.database.run,
            self.predictions,
            self.batcher,
            self.predictions.activity,
            self.analytics,
            settings.batch_max_texts,
            models=list(self.predictors),
            lease=timedelta(seconds=settings.job_lease_seconds),
            quiet_s=settings.job_quiet_ms / 1000,
            max_attempts=settings.job_max_attempts,
            unserved=timedelta(seconds=settings.job_unserved_seconds),
        )
        if admin_key is None:
            log.warning("ADMIN_API_KEY is unset: /analytics/* answer every client that reaches the service")

    @bentoml.on_deployment
    def _migrate() -> None:
        """Bring the analytics schema up to date, once, before any worker starts: two workers
        running DDL at start-up race. A database that is down now does not stop the service:
        rows are buffered and spilled until it is back and migrated (`make migrate`)."""
        try:
            migrate.upgrade(settings.database_url)
        except Exception as exc:
            log.error("analytics migrations not applied (%s); predictions are buffered meanwhile", exc)

    @bentoml.on_startup
    async def _start(self) -> None:
        # Half a million objects live from start-up on (torch, the models, the libraries): one
        # full collection of them stalled the worker for about 0.5 s, a half-second p99 on every
        # endpoint. Frozen, they are never scanned again; request garbage is collected as usual.
        gc.collect()
        gc.freeze()
        if capped := cap_send_buffers(settings.socket_send_buffer_bytes):
            log.info("send buffers of %d listening socket(s): %d bytes", capped, settings.socket_send_buffer_bytes)
        metrics.CPUS.labels(CPUS.source).set(CPUS.cpus)
        await self.gauges.start()
        LOOP_LAG.start()
        self.job_runner.start()

    @bentoml.on_shutdown
    async def _close(self) -> None:
        await self.job_runner.stop()
        self.gauges.stop()
        LOOP_LAG.stop()
        await asyncio.to_thread(self.batcher.close)
        ERRORS.sink = None
        self.database.close()
        await asyncio.to_thread(self.analytics.close)

    # --- endpoints -------------------------------------------------------------------------

    @bentoml.api(route="/predict", input_spec=schemas.PredictRequest)
    async def predict(self, text: str, ctx: bentoml.Context = None) -> schemas.Prediction:  # type: ignore[assignment]
        """The sentiment of one text, by model A (docs/api.md)."""
        return await self._call(self.answer_predict, schemas.PredictRequest(text=text), ctx)

    @bentoml.api(route="/predict/ab", input_spec=schemas.ABRequest)
    async def predict_ab(
        self,
        text: str,
        user_id: str | None = None,
        ctx: bentoml.Context = None,  # type: ignore[assignment]
    ) -> schemas.ABPrediction:
        """The sentiment of one text by the A/B variant the user is assigned to (a random one
        without a user_id)."""
        return await self._call(self.answer_ab, schemas.ABRequest(text=text, user_id=user_id), ctx)

    @bentoml.api(route="/batch", input_spec=schemas.BatchRequest)
    async def batch(self, texts: list[str], ctx: bentoml.Context = None) -> schemas.BatchResponse:  # type: ignore[assignment]
        """The sentiment of up to MAX_BATCH_SIZE texts, in order, by model A."""
        return await self._call(self.answer_batch, schemas.BatchRequest(texts=texts), ctx)

    async def _call(self, handler: Handler, body: BaseModel, ctx: bentoml.Context | None) -> Any:
        """An API method's work, called by BentoML (`ctx`: the request) or by a service holding
        this one in-process (`bentoml.depends` without a server: no request, no client limits;
        a body the contract refuses raises pydantic's ValidationError, a refusal ApiError).
        HTTP requests are answered by service/fastpath.py, which calls the same handlers."""
        if ctx is None:
            return await handler(body, None, None)
        try:
            return await handler(body, ctx.request, ctx.response)
        except ApiError as exc:
            ctx.response.status_code = exc.status
            return await errors.api_error_response(ctx.request, exc)

    def _gate(self, request: Request | None, response: Any, scope: str) -> deps.Gate | None:
        return None if request is None else self.client_limits.gate(request, response, scope)

    async def answer_predict(
        self, body: schemas.PredictRequest, request: Request | None, response: Any
    ) -> schemas.Prediction:
        limit = self._gate(request, response, "predict")
        [prediction] = await self.predictions.predict([body.text], self.tag_a, "/predict", gate=limit)
        return prediction

    async def answer_ab(self, body: schemas.ABRequest, request: Request | None, response: Any) -> schemas.ABPrediction:
        limit = self._gate(request, response, "predict")
        variant = ab.assign(self.experiment, body.user_id, settings.ab_split)
        tag = self.tag_b if variant == "B" else self.tag_a
        [prediction] = await self.predictions.predict([body.text], tag, "/predict/ab", variant, gate=limit)
        return schemas.ABPrediction(**prediction.model_dump(), variant=variant, experiment=self.experiment)

    async def answer_batch(
        self, body: schemas.BatchRequest, request: Request | None, response: Any
    ) -> schemas.BatchResponse:
        limit = self._gate(request, response, "batch")
        predictions = await self.predictions.predict(body.texts, self.tag_a, "/batch", gate=limit)
        cached = sum(p.cached for p in predictions)
        return schemas.BatchResponse(predictions=predictions, count=len(predictions), cached_count=cached)

    @app.post(
        "/feedback", response_model=schemas.FeedbackResponse, responses=schemas.error_responses(400, 404, 413, 429, 503)
    )
    async def feedback(
        self, body: schemas.FeedbackRequest, request: Request, response: Response
    ) -> schemas.FeedbackResponse:
        """Only ids this service issued: nobody can skew the A/B accuracy with invented ones."""
        if not self.request_ids.issued(body.request_id):
            raise ApiError(404, "unknown request_id: not a prediction this service answered")
        await self.client_limits.check(request, response, "feedback")
        await self.database.run(self.analytics.record_feedback, str(body.request_id), body.label)
        return schemas.FeedbackResponse(accepted=True)

    @app.get("/analytics/summary", dependencies=Admin, responses=schemas.error_responses(400, 401, 503))
    async def analytics_summary(
        self, window: Annotated[str, Query(json_schema_extra=schemas.WINDOW_QUERY)] = "1h"
    ) -> dict:
        return await self.database.run(self.analytics.summary, schemas.parse_window(window))

    @app.get("/analytics/ab", dependencies=Admin, responses=schemas.error_responses(400, 401, 503))
    async def analytics_ab(self, window: Annotated[str, Query(json_schema_extra=schemas.WINDOW_QUERY)] = "1h") -> dict:
        report = await self.database.run(self.analytics.ab_report, schemas.parse_window(window))
        return {"experiment": self.experiment, "split": settings.ab_split, **report}

    @app.post(
        "/jobs",
        status_code=202,
        response_model=schemas.JobSubmitted,
        responses=schemas.error_responses(400, 408, 413, 429, 503),
        openapi_extra=schemas.JOB_BODY,
    )
    async def submit_job(self, request: Request, response: Response) -> schemas.JobSubmitted:
        """Texts too many for one request: scored by every worker's idle capacity (docs/api.md).
        The answer holds the job's token, given this once: status, results and cancel need it."""
        await self.client_limits.check(request, response, "jobs")
        body = JobBody(
            request.headers.get("content-type", ""),
            settings.max_job_texts,
            settings.max_text_chars,
            settings.max_job_body_bytes,
        )
        client = self.client_limits.identity(request)
        token, digest = new_token()
        try:
            await self.database.run(self.jobs.check_quotas, client, self.job_quotas)  # before the body
            texts = await read_job_body(request, body, settings.job_upload_timeout_seconds)
            job_id = await self.database.run(
                self.jobs.submit, texts, self.tag_a, client, digest, self.job_quotas, timeout_s=120
            )
        except QuotaExceeded as exc:
            status = 429 if exc.per_client else 503
            raise ApiError(status, f"job refused: {exc}", {"Retry-After": str(JOB_RETRY_AFTER_S)}) from None
        finally:
            body.texts.close()
        response.headers["Location"] = f"/jobs/{job_id}"
        return schemas.JobSubmitted(job_id=job_id, status="queued", total=len(texts), token=token)

    @app.get(
        "/jobs/{job_id}", response_model=schemas.JobProgress, responses=schemas.error_responses(400, 404, 429, 503)
    )
    async def job_status(self, job_id: uuid.UUID, request: Request, response: Response) -> schemas.JobProgress:
        """The job's progress, for its token's holder (or the admin); 404 for anyone else."""
        return schemas.JobProgress(**await self._job(str(job_id), request, response))

    @app.get(
        "/jobs/{job_id}/results",
        response_class=StreamingResponse,
        responses={200: schemas.NDJSON_RESULTS, **schemas.error_responses(400, 404, 409, 429, 503)},
    )
    async def job_results(self, job_id: uuid.UUID, request: Request, response: Response) -> ResultsStream:
        """One {"index", "label", "score", "probabilities"} a line, in input order."""
        progress = await self._job(str(job_id), request, response)
        if progress["status"] != "done":
            raise ApiError(409, f"job {job_id} is {progress['status']}: results once it is done", progress=progress)
        page = functools.partial(self.database.run, results_ndjson, self.jobs, str(job_id))
        return ResultsStream(lambda after: page(after, RESULTS_PAGE), RESULTS_PAGE, settings.job_send_timeout_seconds)

    @app.delete("/jobs/{job_id}", responses=schemas.error_responses(400, 404, 409, 429, 503))
    async def cancel_job(self, job_id: uuid.UUID, request: Request, response: Response) -> dict:
        await self.client_limits.check(request, response, "job_reads")
        status, cancelled = await self.database.run(self.jobs.cancel, str(job_id), self._job_token(request))
        if status is None:
            raise ApiError(404, f"unknown job {job_id}")
        if not cancelled:
            raise ApiError(409, f"job {job_id} is already {status}")
        return {"job_id": job_id, "status": status}

    async def _job(self, job_id: str, request: Request, response: Response) -> dict:
        await self.client_limits.check(request, response, "job_reads")
        progress = await self.database.run(self.jobs.status, job_id, self._job_token(request))
        if progress is None:
            raise ApiError(404, f"unknown job {job_id}")
        return dict(progress)

    @staticmethod
    def _job_token(request: Request) -> str | None:
        """The hash of the job token the request carries (`Authorization: Bearer`); None for
        the admin key, which reaches every job. No token: a hash no job has."""
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if deps.is_admin_key(token):
            return None
        return token_hash(token)

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """From the gauge watcher's state (every few seconds) and the analytics writer's last
        write: no Redis or database round trip, so probes cost nothing and never hang."""
        cache, database = self.gauges.cache_status, self.gauges.database_status
        cache = "down" if self.cache.failing else cache
        database = "down" if not self.analytics.healthy else database
        serving = bool(self.predictors)
        runtimes = {tag: p.runtime for tag, p in self.predictors.items()}
        model = {"A": self.tag_a, "B": self.tag_b, "runtimes": runtimes, "threads": settings.threads_per_worker}
        model["inference_threads"] = settings.inference_threads_per_worker
        model["workers"] = settings.service_workers
        model["cpus"] = {"available": CPUS.cpus, "from": CPUS.source}
        body = {
            "status": "ok" if serving and "down" not in (cache, database) else "degraded",
            "model": model,
            "cache": cache,
            "database": database,
            "rate_limiter": self.gauges.limiter_status,
            "version": VERSION,
        }
        return JSONResponse(body, status_code=200 if serving else 503)


@functools.cache
def openapi_document() -> dict[str, Any]:
    """BentoML's OpenAPI document of the service, the contract's one source: the prediction
    APIs described from their @bentoml.api input and output models, the app's routes by FastAPI,
    both as BentoML merges them. Added here: the APIs' error answers, the contract's ErrorBody
    (BentoML lists errors of its own shape, which the short path never writes)."""
    spec: dict[str, Any] = Sentiment.openapi_spec.asdict()  # type: ignore[attr-defined]  # a bentoml.Service
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        components.pop(name, None)
    error = schemas.ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error.pop("$defs", {}), ErrorBody=error)
    for api in Sentiment.apis.values():  # type: ignore[attr-defined]
        operation = spec["paths"][api.route]["post"]
        answered = next(v for k, v in operation["responses"].items() if str(k) == "200")
        operation["responses"] = {"200": answered, **schemas.openapi_errors(400, 413, 429, 503)}
        operation["requestBody"]["required"] = True  # a request without one is a 400
        # BentoML writes an optional field (`user_id: str | None`) as a plain string; the
        # models accept null there, so the document says so, as pydantic does.
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        own = api.input_spec.model_json_schema()["properties"]
        for name in body.get("properties", {}):
            if any(choice.get("type") == "null" for choice in own.get(name, {}).get("anyOf", [])):
                body["properties"][name] = own[name]
    return spec


@app.get("/docs.json", include_in_schema=False)
async def docs_json() -> JSONResponse:
    """Served in place of BentoML's own /docs.json (the mounted app's routes come first)."""
    return JSONResponse(openapi_document())


# --- guards, on BentoML's outer app, outermost first: built on the routes above ----------------

# The FastAPI endpoints' `self` looked up on the event loop, not in the thread pool (deps.py).
SELF_DEPENDENCIES = deps.self_on_the_loop(app.routes)
# The prediction APIs, then the app's routes: the public ones (all but /health) guarded, timed,
# rate limited, their errors counted.
API_PATHS = tuple(api.route for api in Sentiment.apis.values())  # type: ignore[attr-defined]  # a bentoml.Service
PUBLIC_PATHS = (*API_PATHS, *(p for p in route_paths(app.routes) if p != "/health"))
metrics.register_endpoints([*PUBLIC_PATHS, "/health"], guarded=PUBLIC_PATHS)
BENTOML_SKIP.extend(metrics.ENDPOINTS)
ERRORS = ErrorCounts(PUBLIC_PATHS)
# A request passes the event loop about four times (its body, the cache lookup, the model's
# answer, the cache fill), each after the loop's lag: past a quarter of the queue-delay budget
# of lag, new requests are refused at the door (docs/performance.md: the spike load test).
LOOP_LAG = LoopLag()
# Under overload a worker takes only as many requests at once as it answers within the budget
# (guards.AdaptiveLimit): the rest are refused at the door rather than all waiting for the CPU.
CONCURRENCY = AdaptiveLimit(settings.max_queue_delay_ms / 1000, maximum=MAX_IN_FLIGHT)
# The requests in flight over time: the in-flight share of the saturation gauge.
OCCUPANCY = Occupancy()
# /jobs requests have a budget of their own, and at most a few per client: a slow upload or a
# results reader that stops reading holds its slot for up to its timeout, and must not take
# the prediction endpoints' (docs/api.md, Limits).
JOB_PATHS = tuple(p for p in PUBLIC_PATHS if p.startswith("/jobs"))
# Innermost: the prediction APIs' HTTP requests answered without BentoML's API layer
# (service/fastpath.py), by the handlers their methods call.
SHORT_PATH = fastpath.routes_of(
    Sentiment,
    {
        "predict": (schemas.PredictRequest, Sentiment.inner.answer_predict),  # type: ignore[attr-defined]
        "predict_ab": (schemas.ABRequest, Sentiment.inner.answer_ab),  # type: ignore[attr-defined]
        "batch": (schemas.BatchRequest, Sentiment.inner.answer_batch),  # type: ignore[attr-defined]
    },
)
GUARDS: list[tuple[type, dict[str, Any]]] = [
    (RequestContext, {"public": PUBLIC_PATHS, "on_error": ERRORS}),
    # BentoML's own app answers a path no route matches with a plain-text 404
    (JsonErrors, {}),
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
            "paths": tuple(p for p in PUBLIC_PATHS if p not in JOB_PATHS),
            "lag": LOOP_LAG,
            "max_lag_s": settings.max_queue_delay_ms / 4000,
            "adaptive": CONCURRENCY,
            "sampled": ("/predict", "/batch"),
            "occupancy": OCCUPANCY,
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
    (fastpath.ShortPath, {"routes": SHORT_PATH}),
]
for guard, options in GUARDS:
    Sentiment.add_asgi_middleware(guard, **options)  # type: ignore[attr-defined]  # a bentoml.Service
