"""Bulk jobs in a worker: the runner that scores leased chunks on idle capacity, and the
parsing of a submitted job's body.

Interactive traffic first: the runner hands the batcher one sub-batch (at most the batcher's
batch size) at a time, and only while the batcher's queue is empty, so an interactive request
never waits behind more than one sub-batch. Cached texts are not inferred again; every text
scored is an analytics row under the endpoint `/jobs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from service import metrics
from service.errors import ApiError
from service.predictions import Predictions
from service.schemas import check_text
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
        predictions: Predictions,
        sub_batch: int,
        lease: timedelta = timedelta(seconds=120),
        poll_s: float = 1.0,
    ) -> None:
        self.queue = queue
        self.db = db
        self.predictions = predictions
        self.sub_batch = sub_batch
        self.lease = lease
        self.poll_s = poll_s
        self.worker = f"{os.uname().nodename}-{os.getpid()}"
        self._task: asyncio.Task[None] | None = None
        self._stats_at = self._expired_at = 0.0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="job-runner")

    async def stop(self) -> None:
        """Stop scoring and give this worker's leased chunks back (a half-scored chunk is
        scored again by whoever takes it: its results and rows are kept once by (job, index))."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        try:
            released = await self.db(self.queue.release, self.worker)
        except Exception as exc:  # the database is down: the leases run out instead
            log.warning("job leases of %s not released (%s); they run out in %s", self.worker, exc, self.lease)
        else:
            if released:
                log.info("released %d job chunk(s) leased by %s", released, self.worker)

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
        return self.predictions.batcher.queued_texts() == 0

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
        answers = await self.predictions.answer(texts, chunk.model, wait_when_overloaded=True)
        # one row per (job, index): a chunk scored twice is recorded once
        ids = [f"{chunk.job_id[:24]}-{first + i:011d}" for i in range(len(texts))]
        self.predictions.analytics.record(answers.records(texts, chunk.model, "/jobs", ids))
        probabilities = [v["probabilities"] for v in answers.values]
        return [
            Result(v["label"], v["score"], p["negative"], p["positive"])
            for v, p in zip(answers.values, probabilities, strict=True)
        ]
