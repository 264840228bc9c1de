"""One worker's parts, made when BentoML starts the worker and the service class is
instantiated: the models, the cache, the client limits, the analytics store, the batcher and
the prediction path, the job queue and its runner, and the health watcher. The service's
endpoints (service.py) use them; its hooks start and close them."""

from __future__ import annotations

import asyncio
import gc
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi import Request

from models import runtime
from service import ab, metrics, schemas, workarounds
from service.activity import Activity
from service.clients import ClientLimits, Gate
from service.config import CPUS, Settings
from service.database import DatabaseCalls
from service.guards import Guards
from service.health import GaugeWatcher
from service.job_api import JobApi
from service.jobs import JobRunner
from service.predictions import Predictions, make_batcher
from service.request_ids import RequestIds, load_key
from storage.analytics import AnalyticsStore, SqlAnalyticsStore
from storage.cache import make_cache
from storage.db import make_engine
from storage.jobs import JobQueue
from storage.ratelimit import make_limiter, parse_limit

log = logging.getLogger("sentiment")


class Worker:
    """The parts of one worker serving models `model_a` and `model_b` (BentoML model refs)."""

    def __init__(self, model_a: Any, model_b: Any, settings: Settings, guards: Guards) -> None:
        self.settings = settings
        self.guards = guards
        self.tag_a, self.tag_b = str(model_a.tag), str(model_b.tag)
        self.experiment = f"{model_a.tag.name}-vs-{model_b.tag.name}"
        self.predictors = {
            str(m.tag): runtime.load_dir(Path(m.path), str(m.tag), settings.threads_per_worker)
            for m in (model_a, model_b)
        }
        # Before the first request: requests slowed by a fresh session's first calls would cut
        # the adaptive limit (overload.AdaptiveLimit) at start-up, under load.
        for predictor in self.predictors.values():
            runtime.warm_up(predictor, settings.batch_max_texts)
        # Without Redis: one SQLite file of the instance's, shared by its workers (storage/local.py).
        local = Path(settings.spill_dir) / "embedded.sqlite"
        self.cache = make_cache(settings.redis_url, settings.cache_ttl_seconds, local)
        predict_limit = parse_limit(settings.rate_limit_predict)
        self.client_limits = ClientLimits(
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
        guards.errors.sink = self.analytics
        self.batcher = make_batcher(lambda tag, texts: self.predictors[tag].predict(texts), settings)
        admin_key = settings.admin_api_key.get_secret_value() if settings.admin_api_key else None
        secret = settings.request_id_key.get_secret_value() if settings.request_id_key else None
        self.request_ids = RequestIds(load_key(secret, admin_key, Path(settings.spill_dir) / "request-id.key"))
        self.predictions = Predictions(
            self.cache, self.batcher, self.analytics, self.request_ids.new, Activity(Path(settings.spill_dir))
        )
        self.database = DatabaseCalls()
        self.gauges = GaugeWatcher(
            self.cache,
            self.client_limits.limiter,
            self.analytics,
            self.database,
            concurrency_limit=lambda: guards.concurrency.limit,
            saturation=guards.saturation(self.batcher),
        )
        self.jobs = JobQueue(
            make_engine(settings.database_url, settings.database_pool_size, settings.database_max_overflow),
            timedelta(seconds=settings.job_result_ttl_seconds),
        )
        self.job_api = JobApi(self.jobs, self.database, self.client_limits, self.tag_a, settings)
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

    # --- the prediction APIs' work (the short path and the API methods call these) ----------

    def _gate(self, request: Request | None, response: Any, scope: str) -> Gate | None:
        return None if request is None else self.client_limits.gate(request, response, scope)

    async def answer_predict(self, body: schemas.PredictRequest, request: Request | None, response: Any) -> Any:
        limit = self._gate(request, response, "predict")
        [prediction] = await self.predictions.predict([body.text], self.tag_a, "/predict", gate=limit)
        return prediction

    async def answer_ab(self, body: schemas.ABRequest, request: Request | None, response: Any) -> Any:
        limit = self._gate(request, response, "predict")
        variant = ab.assign(self.experiment, body.user_id, self.settings.ab_split)
        tag = self.tag_b if variant == "B" else self.tag_a
        [prediction] = await self.predictions.predict([body.text], tag, "/predict/ab", variant, gate=limit)
        return schemas.ABPrediction(**prediction.model_dump(), variant=variant, experiment=self.experiment)

    async def answer_batch(self, body: schemas.BatchRequest, request: Request | None, response: Any) -> Any:
        limit = self._gate(request, response, "batch")
        predictions = await self.predictions.predict(body.texts, self.tag_a, "/batch", gate=limit)
        cached = sum(p.cached for p in predictions)
        return schemas.BatchResponse(predictions=predictions, count=len(predictions), cached_count=cached)

    async def start(self) -> None:
        """In the worker's event loop, before its first request."""
        # The half a million objects alive from start-up on (torch, the models, the libraries)
        # are frozen, never scanned again: one full collection of them stalled a worker for
        # about 0.5 s. Request garbage is collected as usual.
        gc.collect()
        gc.freeze()
        settings = self.settings
        if capped := workarounds.cap_send_buffers(settings.socket_send_buffer_bytes):
            log.info("send buffers of %d listening socket(s): %d bytes", capped, settings.socket_send_buffer_bytes)
        metrics.CPUS.labels(CPUS.source).set(CPUS.cpus)
        await self.gauges.start()
        self.guards.loop_lag.start()
        self.job_runner.start()

    async def close(self) -> None:
        """On SIGTERM: the job runner, the watchers, the batcher, then the analytics flushed."""
        await self.job_runner.stop()
        self.gauges.stop()
        self.guards.loop_lag.stop()
        await asyncio.to_thread(self.batcher.close)
        self.guards.errors.sink = None
        self.database.close()
        await asyncio.to_thread(self.analytics.close)
