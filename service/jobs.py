"""Bulk jobs in a worker: the runner that scores leased chunks on idle capacity (a job's body is
parsed by service/job_uploads.py, its results streamed by service/job_results.py).

Interactive traffic first: the runner hands the batcher one sub-batch (at most the batcher's
batch size) at a time, and only while the batcher's queue is empty, so an interactive request
never waits behind more than one sub-batch. Cached texts are not inferred again; every text
scored is an analytics row under the endpoint `/jobs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from service import metrics
from service.activity import Activity
from service.batching import Batcher
from service.errors import ApiError
from service.predictions import Predictions
from storage.analytics.records import AnalyticsStore
from storage.job_leases import Chunk, Result
from storage.jobs import JobQueue

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
# A chunk's lease is renewed every LEASE_RENEWALS-th of JOB_LEASE_SECONDS by a task of its own,
# whatever the scoring waits for, until one sub-batch has been in the background lane for
# HUNG_LEASES leases (taken for hung: the chunk is left to another worker). Why: docs/decisions.md,
# "A chunk's lease is kept while its worker lives".
LEASE_RENEWALS = 3
HUNG_LEASES = 10

DbCall = Callable[..., Awaitable[Any]]


class JobRunner:
    """Leases chunks of any job, of any replica, and scores them while this worker is idle."""

    def __init__(
        self,
        queue: JobQueue,
        db: DbCall,
        predictions: Predictions,
        batcher: Batcher,
        activity: Activity,
        analytics: AnalyticsStore,
        sub_batch: int,
        models: Sequence[str],
        lease: timedelta = timedelta(seconds=120),
        poll_s: float = 1.0,
        quiet_s: float = 0.05,
        max_attempts: int = 3,
        unserved: timedelta = timedelta(minutes=10),
    ) -> None:
        """`predictions` scores texts (the cache, then the batcher's background lane); `batcher`
        says whether interactive texts wait, `activity` how long the instance has been quiet;
        `analytics` takes a row per text scored. `models`: the tags this worker serves; it takes
        only chunks of jobs queued under one."""
        self.queue = queue
        self.db = db
        self.predictions = predictions
        self.batcher = batcher
        self.activity = activity
        self.analytics = analytics
        self.sub_batch = sub_batch
        self.models = tuple(models)
        self.max_attempts = max_attempts
        self.unserved = unserved
        self.lease = lease
        self.poll_s = poll_s
        self.quiet_s = quiet_s
        # The host name and process id alone can repeat: replicas on one host's network (the
        # air-gapped compose stack) share its name, and each container numbers its processes
        # alike. A random part keeps one worker from renewing or releasing another's leases.
        self.worker = f"{os.uname().nodename[:32]}-{os.getpid()}-{secrets.token_hex(4)}"
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # When the chunk being scored last showed it is not stuck: a sub-batch done, or a turn of
        # the wait for a quiet instance (_keep_lease)
        self._alive_at = 0.0
        self._stats_at = self._expired_at = 0.0
        self._claim_warned_at = -60.0
        self._claim_failures = 0

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
            for job_id in await self.db(self.queue.fail_unserved, self.models, self.unserved):
                log.warning("job %s failed: its model is not served here and no worker advanced it", job_id)
                metrics.JOB_CHUNK_FAILURES.labels("job_failed").inc()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._upkeep()
                # a chunk is leased while no interactive text waits; each sub-batch of it waits for a quiet moment
                idle = self.batcher.queued_texts() == 0
                # sole: this worker holds no chunk now, so the claim first queues again one it
                # took in a call that timed out here after it committed (not counted an attempt)
                chunk = (
                    await self.db(self.queue.claim, self.worker, self.lease, self.models, self.max_attempts, True)
                    if idle
                    else None
                )
            except Exception as exc:  # the database is down or slow: try again later
                self._claim_failed(exc)
                chunk = None
            if chunk is None:
                await asyncio.sleep(self.poll_s)
                continue
            try:
                await self.score(chunk)
            except asyncio.CancelledError:
                raise
            except (ApiError, SQLAlchemyError) as exc:  # the database unavailable: not the chunk's fault
                log.warning("job %s chunk %s given back (%s)", chunk.job_id, chunk.chunk, exc)
                with contextlib.suppress(Exception):  # else its lease runs out
                    await self.db(self.queue.give_back, chunk, self.worker)
            except Exception as exc:
                await self._failed(chunk, exc)

    def _claim_failed(self, exc: Exception) -> None:
        """A warning a minute at most while claims fail (each poll tries again)."""
        self._claim_failures += 1
        now = time.monotonic()
        if now - self._claim_warned_at >= 60:
            self._claim_warned_at = now
            log.warning(
                "no job chunk claimed (%d failed claim(s) since the last warning): %s", self._claim_failures, exc
            )
            self._claim_failures = 0

    async def _failed(self, chunk: Chunk, exc: Exception) -> None:
        """A chunk's attempt failed: queued again, or its job failed after JOB_MAX_ATTEMPTS. One
        traceback per chunk (its first attempt here), then a line per attempt."""
        reason = f"{type(exc).__name__}: {exc}"
        try:
            job_failed = await self.db(self.queue.fail, chunk, self.worker, reason, self.max_attempts)
        except Exception as db_exc:  # the lease runs out and the attempt is counted at the next claim
            log.warning("job %s chunk %s failed (%s); not recorded: %s", chunk.job_id, chunk.chunk, reason, db_exc)
            return
        metrics.JOB_CHUNK_FAILURES.labels("job_failed" if job_failed else "retried").inc()
        attempts = f"attempt {chunk.attempt} of {self.max_attempts}"
        if job_failed:
            log.error("job %s failed: chunk %s failed on its last %s: %s", chunk.job_id, chunk.chunk, attempts, reason)
        elif chunk.attempt == 1:
            log.error("job %s chunk %s failed (%s); queued again", chunk.job_id, chunk.chunk, attempts, exc_info=exc)
        else:
            log.warning("job %s chunk %s failed (%s): %s; queued again", chunk.job_id, chunk.chunk, attempts, reason)

    def _wait_s(self) -> float:
        """0 when a job's sub-batch may start now, else how long at least until it may."""
        if self.batcher.queued_texts():
            return 0.005
        return max(0.0, self.quiet_s - self.activity.quiet_for())

    def _sub_batch(self) -> int:
        return self.sub_batch if self.activity.quiet_for() >= LONG_QUIET_S else SMALL_SUB_BATCH

    async def score(self, chunk: Chunk) -> bool:
        """Score a chunk a sub-batch at a time, interactive texts first; False if the job was
        cancelled meanwhile (checked before each sub-batch). The next sub-batch is queued while
        one runs (IN_FLIGHT), so the model does not wait for the event loop to cache and record
        one sub-batch before it gets the next; both are in the batcher's background lane, which
        interactive texts never queue behind."""
        results: list[Result] = []
        running: deque[asyncio.Task[list[Result]]] = deque()
        # The lease is kept by a task of its own while the chunk waits (LEASE_RENEWALS): a chunk
        # slowed by interactive traffic or a starved background lane is not taken from its
        # worker (nor counted an attempt). `lost`: the keeper found the job ended or the chunk
        # another worker's.
        lost = asyncio.Event()
        self._alive_at = time.monotonic()
        keeper = asyncio.ensure_future(self._keep_lease(chunk, lost))
        try:
            start = 0
            while start < len(chunk.texts):
                # renewed before each sub-batch too: a cancelled job stops at its next sub-batch
                if lost.is_set() or not await self.db(self.queue.renew, chunk, self.worker, self.lease):
                    return False
                while (wait := self._wait_s()) > 0:  # interactive requests go first
                    if lost.is_set():
                        return False
                    self._alive_at = time.monotonic()
                    await asyncio.sleep(max(wait, 0.002))
                texts = chunk.texts[start : start + min(self.sub_batch, self._sub_batch())]
                running.append(asyncio.ensure_future(self._predict(chunk, texts, chunk.first + start)))
                start += len(texts)
                if len(running) >= IN_FLIGHT:
                    results += await running.popleft()
                    self._alive_at = time.monotonic()
            while running:
                results += await running.popleft()
                self._alive_at = time.monotonic()
        finally:
            keeper.cancel()
            for task in running:  # cancelled, or a sub-batch failed: the others are not awaited
                task.cancel()
        done = bool(await self.db(self.queue.complete, chunk, results))
        if done:
            metrics.JOB_TEXTS.inc(len(results))
        return done

    async def _keep_lease(self, chunk: Chunk, lost: asyncio.Event) -> None:
        """Renew the lease of the chunk `score` works on every LEASE_RENEWALS-th of it, until
        cancelled; `lost` set, and done, once the job has ended or the chunk is another worker's.
        Not while one sub-batch has been in the background lane for HUNG_LEASES leases."""
        lease_s = self.lease.total_seconds()
        hung = False
        while True:
            await asyncio.sleep(lease_s / LEASE_RENEWALS)
            stuck_s = time.monotonic() - self._alive_at
            if stuck_s > HUNG_LEASES * lease_s:
                if not hung:
                    hung = True
                    log.warning(
                        "job %s chunk %s: no sub-batch done for %.0f s, its lease is left to run out",
                        chunk.job_id,
                        chunk.chunk,
                        stuck_s,
                    )
                continue
            hung = False
            try:
                kept = await self.db(self.queue.renew, chunk, self.worker, self.lease)
            except Exception as exc:  # the database unavailable: tried again at the next turn
                log.warning("job %s chunk %s: lease not renewed (%s)", chunk.job_id, chunk.chunk, exc)
                continue
            if not kept:
                lost.set()
                return

    async def _predict(self, chunk: Chunk, texts: list[str], first: int) -> list[Result]:
        answers = await self.predictions.answer(texts, chunk.model, background=True)
        # one row per (job, index): a chunk scored twice is recorded once
        ids = [f"{chunk.job_id[:24]}-{first + i:011d}" for i in range(len(texts))]
        self.analytics.record(answers.records(texts, chunk.model, "/jobs", ids))
        probabilities = [v["probabilities"] for v in answers.values]
        return [
            Result(v["label"], v["score"], p["negative"], p["positive"])
            for v, p in zip(answers.values, probabilities, strict=True)
        ]
