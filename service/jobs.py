"""Bulk jobs in a worker: the runner that scores leased chunks on idle capacity, and the
parsing of a submitted job's body.

Interactive traffic first: the runner hands the batcher one sub-batch (at most the batcher's
batch size) at a time, and only while the batcher's queue is empty, so an interactive request
never waits behind more than one sub-batch. Cached texts are not inferred again; every text
scored is an analytics row under the endpoint `/jobs`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from models.runtime import Prediction as ModelOutput
from service import metrics
from service.batching import Batcher, Overloaded
from service.errors import ApiError
from service.schemas import check_text
from storage.analytics import AnalyticsStore, PredictionRecord
from storage.cache import CacheValue, PredictionCache, cache_key, text_digest
from storage.jobs import Chunk, JobQueue, Result

log = logging.getLogger(__name__)

DbCall = Callable[..., Awaitable[Any]]


def parse_texts(body: bytes, content_type: str, max_texts: int) -> list[str]:
    """A job's texts from `{"texts": [...]}` or NDJSON (`{"text": ...}` a line); ApiError 400
    naming the problem (the item's index or line number)."""
    if content_type.split(";")[0].strip() in ("application/x-ndjson", "application/jsonl"):
        texts = []
        for n, line in enumerate(body.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise ApiError(400, f"invalid request: line {n}: not valid JSON") from None
            if not isinstance(item, dict) or not isinstance(item.get("text"), str) or set(item) != {"text"}:
                raise ApiError(400, f'invalid request: line {n}: expected {{"text": str}}')
            texts.append(item["text"])
    else:
        try:
            data = json.loads(body)
        except ValueError:
            raise ApiError(400, "invalid request: body: request body is not valid JSON") from None
        if not isinstance(data, dict) or set(data) != {"texts"} or not isinstance(data["texts"], list):
            raise ApiError(400, 'invalid request: texts: expected {"texts": [str, ...]}')
        texts = data["texts"]
    if not 1 <= len(texts) <= max_texts:
        raise ApiError(
            400, f"invalid request: texts: must hold 1 to {max_texts} texts (MAX_JOB_TEXTS), got {len(texts)}"
        )
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ApiError(400, f"invalid request: texts: item {i}: must be a string")
        try:
            out.append(check_text(text))
        except ValueError as exc:
            raise ApiError(400, f"invalid request: texts: item {i}: {exc}") from None
    return out


class JobRunner:
    """Leases chunks of any job, of any replica, and scores them while this worker is idle."""

    def __init__(
        self,
        queue: JobQueue,
        db: DbCall,
        batcher: Batcher[ModelOutput],
        cache: PredictionCache,
        analytics: AnalyticsStore,
        sub_batch: int,
        lease: timedelta = timedelta(seconds=120),
        poll_s: float = 1.0,
    ) -> None:
        self.queue = queue
        self.db = db
        self.batcher = batcher
        self.cache = cache
        self.analytics = analytics
        self.sub_batch = sub_batch
        self.lease = lease
        self.poll_s = poll_s
        self.worker = f"{os.uname().nodename}-{os.getpid()}"
        self._task: asyncio.Task[None] | None = None
        self._stats_at = self._expired_at = 0.0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="job-runner")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _upkeep(self) -> None:
        """The queue's gauges, and finished jobs past their time to live removed."""
        now = time.monotonic()
        if now - self._stats_at >= 5:
            self._stats_at = now
            metrics.observe_jobs(await self.db(self.queue.stats))
        if now - self._expired_at >= 60:
            self._expired_at = now
            await self.db(self.queue.expire)

    async def _run(self) -> None:
        while True:
            try:
                await self._upkeep()
                chunk = await self.db(self.queue.claim, self.worker, self.lease) if self._idle() else None
            except Exception as exc:  # the database is down: try again later
                log.debug("no job chunk claimed: %s", exc)
                chunk = None
            if chunk is None:
                await asyncio.sleep(self.poll_s)
                continue
            try:
                await self.score(chunk)
            except asyncio.CancelledError:
                raise
            except Exception:  # the lease runs out and another worker takes the chunk
                log.exception("job %s chunk %s failed; left for its lease to run out", chunk.job_id, chunk.chunk)

    def _idle(self) -> bool:
        return self.batcher.queued_texts() == 0

    async def score(self, chunk: Chunk) -> bool:
        """Score a chunk a sub-batch at a time, interactive texts first; False if the job was
        cancelled meanwhile (checked before each sub-batch)."""
        results: list[Result] = []
        for start in range(0, len(chunk.texts), self.sub_batch):
            if not await self.db(self.queue.active, chunk.job_id):
                return False
            while not self._idle():  # interactive texts waiting: they go first
                await asyncio.sleep(0.002)
            results += await self._predict(chunk, chunk.texts[start : start + self.sub_batch], chunk.first + start)
        done = bool(await self.db(self.queue.complete, chunk, results))
        if done:
            metrics.JOB_TEXTS.inc(len(results))
        return done

    async def _predict(self, chunk: Chunk, texts: list[str], first: int) -> list[Result]:
        started = time.perf_counter()
        digests = [text_digest(t) for t in texts]
        keys = [cache_key(chunk.model, digest=d) for d in digests]
        found: list[CacheValue | None] = await self.cache.get_many(keys)
        missing = [i for i, hit in enumerate(found) if hit is None]
        if missing:
            while True:
                try:
                    outputs = await self.batcher.predict(chunk.model, [texts[i] for i in missing])
                    break
                except Overloaded:  # interactive traffic fills the queue: wait for it
                    await asyncio.sleep(0.05)
            fresh: dict[str, CacheValue] = {}
            for i, out in zip(missing, outputs, strict=True):
                value: CacheValue = {"label": out.label, "score": out.score, "probabilities": out.probabilities}
                found[i] = fresh[keys[i]] = value
            await self.cache.set_many(fresh)
        latency_ms = round((time.perf_counter() - started) * 1000, 2)
        inferred = set(missing)
        results, records = [], []
        for i, answer in enumerate(found):
            assert answer is not None
            probs = answer["probabilities"]
            results.append(Result(answer["label"], answer["score"], probs["negative"], probs["positive"]))
            records.append(
                PredictionRecord(
                    # one row per (job, index): a chunk scored twice is recorded once
                    request_id=f"{chunk.job_id[:24]}-{first + i:011d}",
                    endpoint="/jobs",
                    model=chunk.model,
                    label=answer["label"],
                    score=answer["score"],
                    cached=i not in inferred,
                    latency_ms=latency_ms,
                    text_sha256=digests[i],
                    text_length=len(texts[i]),
                )
            )
        self.analytics.record(records)
        return results
