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
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from service import metrics
from service.errors import ApiError
from service.predictions import Predictions
from service.schemas import check_text
from storage.jobs import Chunk, JobQueue, Result

log = logging.getLogger(__name__)
# Sub-batches of a chunk in the batcher at once: one running, the next queued behind it.
IN_FLIGHT = 2
# A job's sub-batch starts only once the instance has served no interactive prediction for
# JOB_QUIET_MS (service/activity.py): a forward call of a job slows one of an interactive request
# on the other core. Right after traffic, sub-batches are small (SMALL_SUB_BATCH texts, a short
# forward call that a request arriving meanwhile waits out quickly); after LONG_QUIET_S without
# traffic, the batcher's full size, the most texts per CPU second.
LONG_QUIET_S = 1.0
SMALL_SUB_BATCH = 8

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
        quiet_s: float = 0.05,
    ) -> None:
        self.queue = queue
        self.db = db
        self.predictions = predictions
        self.sub_batch = sub_batch
        self.lease = lease
        self.poll_s = poll_s
        self.quiet_s = quiet_s
        self.worker = f"{os.uname().nodename}-{os.getpid()}"
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stats_at = self._expired_at = 0.0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="job-runner")

    async def stop(self) -> None:
        """Stop scoring and give this worker's leased chunks back (a half-scored chunk is
        scored again by whoever takes it: its results and rows are kept once by (job, index))."""
        if self._task is None:
            return
        self._stopping = True
        # Cancelled again until it ends: on Python 3.11 asyncio.wait_for (in the database calls)
        # can swallow a cancellation that arrives as its call finishes, and the loop would go on.
        while not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=1.0)
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
        while not self._stopping:
            try:
                await self._upkeep()
                # a chunk is leased while no interactive text waits; each sub-batch of it waits for a quiet moment
                idle = self.predictions.batcher.queued_texts() == 0
                chunk = await self.db(self.queue.claim, self.worker, self.lease) if idle else None
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

    def _wait_s(self) -> float:
        """0 when a job's sub-batch may start now, else how long at least until it may."""
        if self.predictions.batcher.queued_texts():
            return 0.005
        return max(0.0, self.quiet_s - self.predictions.activity.quiet_for())

    def _sub_batch(self) -> int:
        return self.sub_batch if self.predictions.activity.quiet_for() >= LONG_QUIET_S else SMALL_SUB_BATCH

    async def score(self, chunk: Chunk) -> bool:
        """Score a chunk a sub-batch at a time, interactive texts first; False if the job was
        cancelled meanwhile (checked before each sub-batch). The next sub-batch is queued while
        one runs (IN_FLIGHT), so the model does not wait for the event loop to cache and record
        one sub-batch before it gets the next; both are in the batcher's background lane, which
        interactive texts never queue behind."""
        results: list[Result] = []
        running: deque[asyncio.Task[list[Result]]] = deque()
        try:
            start = 0
            while start < len(chunk.texts):
                if not await self.db(self.queue.active, chunk.job_id):
                    return False
                while (wait := self._wait_s()) > 0:  # interactive requests go first
                    await asyncio.sleep(max(wait, 0.002))
                texts = chunk.texts[start : start + min(self.sub_batch, self._sub_batch())]
                running.append(asyncio.ensure_future(self._predict(chunk, texts, chunk.first + start)))
                start += len(texts)
                if len(running) >= IN_FLIGHT:
                    results += await running.popleft()
            while running:
                results += await running.popleft()
        finally:
            for task in running:  # cancelled, or a sub-batch failed: the others are not awaited
                task.cancel()
        done = bool(await self.db(self.queue.complete, chunk, results))
        if done:
            metrics.JOB_TEXTS.inc(len(results))
        return done

    async def _predict(self, chunk: Chunk, texts: list[str], first: int) -> list[Result]:
        answers = await self.predictions.answer(texts, chunk.model, background=True)
        # one row per (job, index): a chunk scored twice is recorded once
        ids = [f"{chunk.job_id[:24]}-{first + i:011d}" for i in range(len(texts))]
        self.predictions.analytics.record(answers.records(texts, chunk.model, "/jobs", ids))
        probabilities = [v["probabilities"] for v in answers.values]
        return [
            Result(v["label"], v["score"], p["negative"], p["positive"])
            for v, p in zip(answers.values, probabilities, strict=True)
        ]
