"""The sentiment service: its endpoints and how they are wired (docs/api.md is the contract).

Read top to bottom as a request goes: the guards it meets first (guards.py; their state is
made here, they are put around the service at the bottom, once its routes exist), the app, the
service holding one worker's parts, then its endpoints. Every inference, from /predict,
/predict/ab or /batch, goes through the prediction path (predictions.py): the cache, then one
in-process batcher per worker (batching.py) that groups concurrent requests' texts into one
forward call off the event loop, then one analytics row per answer (storage/analytics).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import bentoml
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from service import errors, schemas, workarounds
from service.clients import require_admin
from service.config import get_settings, project_version
from service.errors import ApiError
from service.guards import Guards
from service.health import health_response
from service.job_results import ResultsStream
from service.worker import Worker
from storage import migrate

log = logging.getLogger("sentiment")
settings = get_settings()
VERSION = project_version()
GUARDS = Guards(settings)

app = FastAPI(title="sentiment", docs_url=None, redoc_url=None, openapi_url=None)
errors.install(app)
workarounds.install(app)
Admin = [Depends(require_admin)]


@bentoml.service(
    name="sentiment",
    workers=settings.service_workers,
    traffic={"timeout": 60},
    # BentoML's access log, request metrics and tracing span cost CPU per request (docs/performance.md):
    # the public routes skip them (they have their own metrics). ACCESS_LOG=true logs them; to trace
    # them, set tracing.excluded_urls in a BentoML config.
    logging={
        "access": {"enabled": settings.access_log, "skip_paths": [] if settings.access_log else GUARDS.bentoml_skip}
    },
    tracing={"excluded_urls": GUARDS.bentoml_skip},
    envs=[{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "BENTOML_DO_NOT_TRACK", "value": "True"}],
)
@bentoml.asgi_app(app, path="/")
class Sentiment(Worker):
    """Sentiment predictions with caching, rate limits, an A/B test and analytics: the
    endpoints, on one worker's parts (worker.py)."""

    model_a = bentoml.models.BentoModel(settings.sentiment_model)
    model_b = bentoml.models.BentoModel(settings.ab_model_b)

    def __init__(self) -> None:
        super().__init__(self.model_a, self.model_b, settings, GUARDS)

    @bentoml.on_deployment
    def _migrate() -> None:
        """Bring the analytics schema up to date, once, before any worker starts (two workers
        running DDL race). A database down now does not stop the service: rows are spilled
        until it is back and migrated (`make migrate`)."""
        try:
            migrate.upgrade(settings.database_url)
        except Exception as exc:
            log.error("analytics migrations not applied (%s); predictions are buffered meanwhile", exc)

    @bentoml.on_startup
    async def _start(self) -> None:
        await self.start()

    @bentoml.on_shutdown
    async def _close(self) -> None:
        await self.close()

    # --- the prediction APIs: HTTP requests reach their handlers through the short path ------

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

    async def _call(self, handler: Callable[..., Awaitable[Any]], body: BaseModel, ctx: bentoml.Context | None) -> Any:
        """An API method's work, called by BentoML (`ctx`: the request) or by a service holding
        this one in-process (`bentoml.depends` without a server: no request, no client limits;
        a body the contract refuses raises pydantic's ValidationError, a refusal ApiError)."""
        if ctx is None:
            return await handler(body, None, None)
        try:
            return await handler(body, ctx.request, ctx.response)
        except ApiError as exc:
            ctx.response.status_code = exc.status
            return errors.api_error_response(ctx.request.scope, exc)

    # --- the app's routes -------------------------------------------------------------------

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
        return await self.job_api.submit(request, response)

    @app.get(
        "/jobs/{job_id}", response_model=schemas.JobProgress, responses=schemas.error_responses(400, 404, 429, 503)
    )
    async def job_status(self, job_id: uuid.UUID, request: Request, response: Response) -> schemas.JobProgress:
        """The job's progress, for its token's holder (or the admin); 404 for anyone else."""
        return schemas.JobProgress(**await self.job_api.progress(str(job_id), request, response))

    @app.get(
        "/jobs/{job_id}/results",
        response_class=StreamingResponse,
        responses={200: schemas.NDJSON_RESULTS, **schemas.error_responses(400, 404, 409, 429, 503)},
    )
    async def job_results(self, job_id: uuid.UUID, request: Request, response: Response) -> ResultsStream:
        """One {"index", "label", "score", "probabilities"} a line, in input order."""
        return await self.job_api.results(str(job_id), request, response)

    @app.delete("/jobs/{job_id}", responses=schemas.error_responses(400, 404, 409, 429, 503))
    async def cancel_job(self, job_id: uuid.UUID, request: Request, response: Response) -> dict:
        return await self.job_api.cancel(str(job_id), request, response)

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """From the gauge watcher's last states: no Redis or database round trip (health.py)."""
        return health_response(self, VERSION)


@app.get("/docs.json", include_in_schema=False)
async def docs_json() -> JSONResponse:
    """Served in place of BentoML's own /docs.json (the mounted app's routes come first)."""
    return JSONResponse(workarounds.openapi_document(Sentiment))


# --- last, the guards around all of the above, as a request meets them (guards.py) -------------
inner = Sentiment.inner  # type: ignore[attr-defined]  # a bentoml.Service
# The APIs the short path answers (fastpath.py): {API name: (the body's model, the handler it awaits)}
SHORT_PATH: dict[str, tuple[type[BaseModel], Any]] = {
    "predict": (schemas.PredictRequest, inner.answer_predict),
    "predict_ab": (schemas.ABRequest, inner.answer_ab),
    "batch": (schemas.BatchRequest, inner.answer_batch),
}
GUARDS.install(Sentiment, app, SHORT_PATH)
