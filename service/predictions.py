"""The prediction path shared by /predict, /predict/ab and /batch: the cache first, the batcher
for the misses, then the cache fill and one analytics row per answer."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from models.runtime import Prediction as ModelOutput
from service import metrics
from service.activity import Activity
from service.batching import Batcher, Overloaded
from service.config import Settings
from service.errors import ApiError
from service.schemas import Prediction
from storage.analytics import AnalyticsStore, PredictionRecord
from storage.cache import CacheValue, PredictionCache, cache_key, text_digest


def make_batcher(infer: Callable[[str, list[str]], list[ModelOutput]], settings: Settings) -> Batcher[ModelOutput]:
    """The worker's batcher around `infer(model tag, texts)`, as the settings size it."""
    return Batcher(
        infer,
        max_batch=settings.batch_max_texts,
        max_wait_s=settings.batch_wait_ms / 1000,
        max_delay_s=settings.max_queue_delay_ms / 1000,
        on_batch=metrics.observe_batch,
        on_start=metrics.observe_waits,
        threads=settings.inference_threads_per_worker,
    )


@dataclass(frozen=True)
class Answers:
    """The cache's or the model's answer for each text, which texts the model ran, how long."""

    values: list[CacheValue]
    inferred: set[int]
    digests: list[str]
    seconds: float

    @property
    def latency_ms(self) -> float:
        return round(self.seconds * 1000, 2)

    def records(
        self,
        texts: Sequence[str],
        tag: str,
        endpoint: str,
        ids: Sequence[str],
        variant: str | None = None,
        keep_text: bool = False,
    ) -> list[PredictionRecord]:
        """One analytics row per text (its text only with `keep_text`, STORE_TEXT deciding then)."""
        return [
            PredictionRecord(
                request_id=ids[i],
                endpoint=endpoint,
                model=tag,
                label=value["label"],
                score=value["score"],
                cached=i not in self.inferred,
                latency_ms=self.latency_ms,
                text_sha256=self.digests[i],
                text_length=len(texts[i]),
                variant=variant,
                text=texts[i] if keep_text else None,
            )
            for i, value in enumerate(self.values)
        ]


class Predictions:
    """Predictions for texts by a model tag, built from a cache, a batcher and an analytics sink."""

    def __init__(
        self,
        cache: PredictionCache,
        batcher: Batcher[ModelOutput],
        analytics: AnalyticsStore,
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
        activity: Activity | None = None,
    ) -> None:
        self.cache = cache
        self.batcher = batcher
        self.analytics = analytics
        self.new_id = new_id
        self.activity = activity or Activity(None)

    async def answer(
        self,
        texts: Sequence[str],
        tag: str,
        gate: Callable[[], Awaitable[None]] | None = None,
        background: bool = False,
    ) -> Answers:
        """The cache first, the batcher for the misses, then the cache fill. Overloaded when the
        batcher sheds them; `background` (bulk jobs): in the batcher's background lane, on the
        CPU interactive requests leave, never shed."""
        if not background:  # the instance is busy: bulk jobs hold back (service/activity.py)
            self.activity.mark()
            try:
                return await self._answer(texts, tag, gate, background)
            finally:
                self.activity.mark()
        return await self._answer(texts, tag, gate, background)

    async def _answer(
        self, texts: Sequence[str], tag: str, gate: Callable[[], Awaitable[None]] | None, background: bool
    ) -> Answers:
        started = time.perf_counter()
        digests = [text_digest(t) for t in texts]
        keys = [cache_key(tag, digest=d) for d in digests]
        lookup = self.cache.get_many(keys)
        if gate is None:
            found: list[CacheValue | None] = await lookup
        else:
            found, _ = await asyncio.gather(lookup, gate())
        missing = [i for i, hit in enumerate(found) if hit is None]
        if missing:
            outputs = await self.batcher.predict(tag, [texts[i] for i in missing], background)
            fresh: dict[str, CacheValue] = {}
            for i, out in zip(missing, outputs, strict=True):
                value: CacheValue = {"label": out.label, "score": out.score, "probabilities": out.probabilities}
                found[i] = fresh[keys[i]] = value
            await self.cache.set_many(fresh)
        values = [v for v in found if v is not None]
        assert len(values) == len(texts)
        return Answers(values, set(missing), digests, time.perf_counter() - started)

    async def predict(
        self,
        texts: Sequence[str],
        tag: str,
        endpoint: str,
        variant: str | None = None,
        gate: Callable[[], Awaitable[None]] | None = None,
    ) -> list[Prediction]:
        """One Prediction per text, in order; ApiError 503 when the batcher sheds the request.

        `gate` (the rate limit) is run beside the cache lookup, both being round trips to Redis;
        an error it raises (429) ends the request before anything is inferred or recorded.
        """
        try:
            answers = await self.answer(texts, tag, gate)
        except Overloaded as exc:
            metrics.OVERLOAD_REJECTIONS.labels(endpoint, "queue_delay").inc()
            raise ApiError(503, "service overloaded, retry later", {"Retry-After": str(exc.retry_after_s)}) from exc
        metrics.CACHE_LOOKUPS.labels("hit").inc(len(texts) - len(answers.inferred))
        metrics.CACHE_LOOKUPS.labels("miss").inc(len(answers.inferred))
        metrics.PREDICTION_SECONDS.labels(endpoint, variant or "none").observe(answers.seconds)
        ids = [self.new_id() for _ in texts]
        predictions = []
        for i, value in enumerate(answers.values):
            p = Prediction(
                request_id=ids[i],
                label=value["label"],
                score=value["score"],
                probabilities=value["probabilities"],
                model=tag,
                cached=i not in answers.inferred,
                latency_ms=answers.latency_ms,
            )
            predictions.append(p)
            metrics.PREDICTIONS.labels(endpoint, tag, variant or "none", p.label, str(p.cached).lower()).inc()
        records = answers.records(texts, tag, endpoint, ids, variant, keep_text=True)
        # Logged before the answer leaves (one write(2)): an answered prediction has its row.
        self.analytics.record(records)
        return predictions
