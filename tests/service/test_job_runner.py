"""The job runner beside interactive traffic: a job's sub-batches wait for a quiet instance, are
small right after traffic and full after a long quiet, and run in the batcher's background lane.

Real pieces: the job queue on SQLite, the batcher, the prediction path; the model is a function
recording its calls, so each forward call's texts and time are known.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from models.runtime import Prediction
from service.activity import Activity
from service.batching import Batcher
from service.database import DatabaseCalls
from service.errors import ApiError
from storage import migrate
from storage.analytics.records import PredictionRecord
from storage.cache import MemoryPredictionCache
from storage.db import make_engine
from storage.jobs import JobQueue

MODEL = "m:1"
QUIET_S = 0.2


class Model:
    """Records (time, texts, thread name) of each forward call."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, list[str], str]] = []

    def __call__(self, tag: str, texts: list[str]) -> list[Prediction]:
        self.calls.append((time.monotonic(), list(texts), threading.current_thread().name))
        return [Prediction("positive", 0.9, {"negative": 0.1, "positive": 0.9}) for _ in texts]


class Rows:
    def __init__(self) -> None:
        self.rows: list[PredictionRecord] = []

    def record(self, records: Iterable[PredictionRecord]) -> None:
        self.rows.extend(records)

    def __getattr__(self, name: str) -> Any:  # the rest of the store's interface is not used here
        raise AttributeError(name)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def queue(tmp_path: Path) -> JobQueue:
    url = f"sqlite:///{tmp_path}/jobs.db"
    migrate.upgrade(url)
    return JobQueue(make_engine(url))


async def _until(condition, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.anyio
async def test_job_sub_batches_wait_for_a_quiet_instance_and_grow_after_a_long_quiet(
    queue: JobQueue, tmp_path: Path
) -> None:
    # Imported here, not at collection: service.jobs imports service.schemas, which reads the
    # settings once, and the other service tests set the environment they are read from first.
    from service import jobs as job_module

    model = Model()
    runner, close = _runner(queue, model, tmp_path, quiet_s=QUIET_S, lease=timedelta(seconds=30))
    rows = runner.analytics
    busy_until = time.monotonic() + 1.0
    runner.start()
    try:
        # interactive traffic: another worker of the instance marks a request every 20 ms for 1 s
        other_worker = Activity(tmp_path / "spill")
        job = queue.submit([f"text {i}" for i in range(80)], MODEL, "c", "t" * 64, chunk_texts=80)
        while time.monotonic() < busy_until:
            other_worker.mark()
            await asyncio.sleep(0.02)
        quiet_from = time.monotonic()
        await _until(lambda: (queue.status(job, None) or {}).get("status") == "done")
        first = [(t, texts, name) for t, texts, name in model.calls]
        assert first and all(t >= quiet_from + QUIET_S - 0.05 for t, _, _ in first)  # none before the quiet
        assert all(name == "inference-background" for _, _, name in first)
        assert all(len(texts) <= job_module.SMALL_SUB_BATCH for _, texts, _ in first)  # right after traffic: small
        assert [text for _, texts, _ in first for text in texts] == [f"text {i}" for i in range(80)]
        assert len(rows.rows) == 80 and {r.endpoint for r in rows.rows} == {"/jobs"}

        model.calls.clear()
        await asyncio.sleep(job_module.LONG_QUIET_S + 0.2)
        later = queue.submit([f"later {i}" for i in range(64)], MODEL, "c", "t" * 64, chunk_texts=64)
        await _until(lambda: (queue.status(later, None) or {}).get("status") == "done")
        assert [len(texts) for _, texts, _ in model.calls] == [32, 32]  # after a long quiet: full sub-batches
    finally:
        await close()


class Broken(Model):
    """A model whose every forward call raises."""

    def __call__(self, tag: str, texts: list[str]) -> list[Prediction]:
        super().__call__(tag, texts)
        raise RuntimeError("the model broke")


@pytest.mark.anyio
async def test_a_chunk_that_always_fails_ends_its_job_after_its_attempts(
    queue: JobQueue, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from service import metrics

    model = Broken()
    runner, close = _runner(queue, model, tmp_path, lease=timedelta(seconds=30))
    failures = metrics.JOB_CHUNK_FAILURES
    before = {o: failures.labels(o)._value.get() for o in ("retried", "job_failed")}
    runner.start()
    try:
        job = queue.submit(["a text the model cannot score"], MODEL, "c", "t" * 64)
        await _until(lambda: (queue.status(job, None) or {}).get("status") == "failed")
        status = queue.status(job, None)
        assert status is not None and "failed 3 times" in status["error"] and "the model broke" in status["error"]
        calls = len(model.calls)
        await asyncio.sleep(0.5)  # no endless retry: the model is not called again
        assert calls == len(model.calls) == 3
    finally:
        await close()
    assert failures.labels("retried")._value.get() - before["retried"] == 2
    assert failures.labels("job_failed")._value.get() - before["job_failed"] == 1
    tracebacks = [r for r in caplog.records if r.exc_info and "job" in r.getMessage()]
    assert len(tracebacks) == 1, [r.getMessage() for r in caplog.records]  # one traceback, on the first attempt


# --- the lease of a chunk that waits ---------------------------------------------------------

LEASE = timedelta(seconds=1)


class Gated(Model):
    """A model whose forward calls wait until `go` is set: a call in the background lane that
    takes longer than any lease (the lane starved of CPU, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()
        self.go = threading.Event()

    def __call__(self, tag: str, texts: list[str]) -> list[Prediction]:
        self.started.set()
        self.go.wait(timeout=60)  # bounded: a failed test does not hold the lane's thread for good
        return super().__call__(tag, texts)


def _runner(  # type: ignore[no-untyped-def]
    queue: JobQueue,
    model: Model,
    tmp_path: Path,
    quiet_s: float = 0.0,
    timeout_s: float = 10.0,
    lease: timedelta = LEASE,
):
    """A runner on `model` with an in-process cache and a Rows analytics store (runner.analytics),
    and the coroutine that stops it and closes its parts."""
    from service.jobs import JobRunner
    from service.predictions import Predictions

    database = DatabaseCalls(timeout_s=timeout_s)
    batcher, activity, rows = Batcher(model, max_batch=32), Activity(tmp_path / "spill"), Rows()
    predictions = Predictions(MemoryPredictionCache(60), batcher, rows, activity=activity)  # type: ignore[arg-type]
    runner = JobRunner(
        queue, database.run, predictions, batcher, activity, rows, 32, [MODEL], lease, poll_s=0.05, quiet_s=quiet_s
    )

    async def close() -> None:
        await runner.stop()
        batcher.close()
        database.close()
        activity.close()

    return runner, close


async def _others_never_take_it(queue: JobQueue, seconds: float) -> None:
    """Another worker tries to claim the chunk for `seconds` (leases long): it never gets it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        taken = await asyncio.to_thread(queue.claim, "other", timedelta(seconds=30), [MODEL], 3)
        assert taken is None, f"chunk {taken.chunk} taken from its waiting worker (attempt {taken.attempt})"
        await asyncio.sleep(0.1)


def _attempts(queue: JobQueue, job: str) -> list[int]:
    from storage.tables import job_chunks

    with queue.engine.connect() as conn:
        return list(conn.execute(sa.select(job_chunks.c.attempts).where(job_chunks.c.job_id == job)).scalars())


def _status(queue: JobQueue, job: str) -> str | None:
    return (queue.status(job, None) or {}).get("status")


@pytest.mark.anyio
async def test_a_chunk_keeps_its_lease_while_its_sub_batch_waits_in_the_background_lane(
    queue: JobQueue, tmp_path: Path
) -> None:
    """A forward call slower than the lease (the nice-19 lane beside busy processes) does not cost
    the chunk its lease, nor an attempt: before, three such waits failed a healthy job."""
    model = Gated()
    runner, close = _runner(queue, model, tmp_path)
    runner.start()
    try:
        job = queue.submit([f"text {i}" for i in range(40)], MODEL, "c", "t" * 64, chunk_texts=40)
        await _until(model.started.is_set)  # its first sub-batch in the lane, the second behind it
        await _others_never_take_it(queue, 3 * LEASE.total_seconds())
        model.go.set()
        await _until(lambda: _status(queue, job) == "done")
    finally:
        model.go.set()
        await close()
    assert _attempts(queue, job) == [1] and queue.workers(job) == {runner.worker: 1}


@pytest.mark.anyio
async def test_a_chunk_keeps_its_lease_while_it_waits_for_a_quiet_instance(queue: JobQueue, tmp_path: Path) -> None:
    """Interactive traffic longer than the lease holds a claimed chunk back without costing it
    its lease or an attempt."""
    model = Model()
    runner, close = _runner(queue, model, tmp_path, quiet_s=QUIET_S)
    other_worker = Activity(tmp_path / "spill")  # another worker of the instance, serving requests
    busy = True

    async def traffic() -> None:
        while busy:
            other_worker.mark()
            await asyncio.sleep(0.02)

    marking = asyncio.ensure_future(traffic())
    runner.start()
    try:
        job = queue.submit([f"text {i}" for i in range(40)], MODEL, "c", "t" * 64, chunk_texts=40)
        await _until(lambda: _status(queue, job) == "running")  # claimed, waiting for a quiet moment
        await _others_never_take_it(queue, 3 * LEASE.total_seconds())
        assert model.calls == []  # nothing scored while the instance was busy
        busy = False
        await _until(lambda: _status(queue, job) == "done")
    finally:
        busy = False
        await marking
        await close()
        other_worker.close()
    assert _attempts(queue, job) == [1] and queue.workers(job) == {runner.worker: 1}


@pytest.mark.anyio
async def test_a_hung_sub_batch_leaves_its_chunk_to_another_worker(
    queue: JobQueue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease is kept only while the chunk's sub-batches come back: one in the lane for
    HUNG_LEASES leases is taken for hung, and its chunk's lease runs out (another worker's now)."""
    from service import jobs as job_module
    from storage.job_leases import Result

    monkeypatch.setattr(job_module, "HUNG_LEASES", 2)
    model = Gated()
    runner, close = _runner(queue, model, tmp_path)
    runner.start()
    try:
        job = queue.submit([f"text {i}" for i in range(40)], MODEL, "c", "t" * 64, chunk_texts=40)
        await _until(model.started.is_set)
        taken = []

        async def claimed() -> bool:
            taken.append(await asyncio.to_thread(queue.claim, "other", timedelta(seconds=30), [MODEL], 3))
            return taken[-1] is not None

        async with asyncio.timeout(20):
            while not await claimed():
                await asyncio.sleep(0.1)
        chunk = taken[-1]
        assert chunk.attempt == 2
        model.go.set()  # the hung call returns: its worker finds the chunk another's and stops
        assert queue.complete(chunk, [Result("positive", 0.9, 0.1, 0.9) for _ in chunk.texts])
        assert _status(queue, job) == "done"
    finally:
        model.go.set()
        await close()
    assert queue.workers(job) == {"other": 1}


class LateClaims(JobQueue):
    """A queue whose first `late` claims commit, then answer after `delay_s`: past the caller's
    timeout (a database slowed by load)."""

    def __init__(self, queue: JobQueue, late: int, delay_s: float) -> None:
        super().__init__(queue.engine)
        self.late, self.delay_s = late, delay_s

    def claim(self, *args: Any, **kwargs: Any) -> Any:
        chunk = super().claim(*args, **kwargs)
        if chunk is not None and self.late > 0:
            self.late -= 1
            time.sleep(self.delay_s)
        return chunk


@pytest.mark.anyio
async def test_a_claim_answered_after_its_timeout_costs_its_chunk_no_attempt(queue: JobQueue, tmp_path: Path) -> None:
    """A claim that commits but answers too late leaves a lease its worker never saw: the worker's
    next claim queues that chunk again, uncounted. Before, each such lease ran out and counted an
    attempt: three slow claims failed a healthy job ("its lease ran out")."""
    late = LateClaims(queue, late=3, delay_s=0.6)
    runner, close = _runner(late, Model(), tmp_path, timeout_s=0.3)
    runner.start()
    try:
        job = queue.submit([f"text {i}" for i in range(40)], MODEL, "c", "t" * 64, chunk_texts=40)
        await _until(lambda: _status(queue, job) in ("done", "failed"))
    finally:
        await close()
    assert late.late == 0  # the three late claims happened
    assert (queue.status(job, None) or {}).get("error") is None
    assert _status(queue, job) == "done" and _attempts(queue, job) == [1]


@pytest.mark.anyio
async def test_a_database_call_given_up_before_it_started_is_not_left_counted() -> None:
    """Calls queued behind a stuck thread and given up on by their timeout leave the count of
    unfinished calls, or the service would soon refuse every database call as stuck."""
    database = DatabaseCalls(threads=1, timeout_s=0.1)
    release = threading.Event()
    try:
        for _ in range(2):  # the stuck call, and one queued behind it
            with pytest.raises(ApiError):
                await database.run(release.wait, 5)
        assert database.unfinished == 1  # the running one; the queued one was cancelled
        release.set()
        await _until(lambda: database.unfinished == 0)
        assert await database.run(lambda: 42) == 42 and not database.stuck
    finally:
        release.set()
        database.close()
