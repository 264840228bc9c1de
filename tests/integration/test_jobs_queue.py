"""The bulk-job queue on real PostgreSQL and SQLite: leases, concurrency, idempotence, cancel."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from storage import migrate
from storage.db import make_engine
from storage.jobs import JobQueue, Result

pytestmark = pytest.mark.integration


@pytest.fixture(params=["postgresql", "sqlite"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> JobQueue:
    url = request.getfixturevalue("database_url") if request.param == "postgresql" else f"sqlite:///{tmp_path}/j.db"
    migrate.upgrade(url)
    return JobQueue(make_engine(url))


def _score(texts: list[str]) -> list[Result]:
    return [Result("positive", 0.9, 0.1, 0.9) if "good" in t else Result("negative", 0.8, 0.8, 0.2) for t in texts]


def test_a_job_is_scored_chunk_by_chunk_with_one_result_per_text_in_order(queue: JobQueue) -> None:
    texts = [f"{'good' if i % 3 else 'bad'} text {i}" for i in range(1000)]
    job = queue.submit(texts, "m:1", "203.0.113.1", chunk_texts=128)
    assert queue.status(job)["status"] == "queued"  # type: ignore[index]
    chunks = 0
    while (chunk := queue.claim("w1", timedelta(seconds=30))) is not None:
        assert queue.status(job)["status"] == "running"  # type: ignore[index]
        assert queue.complete(chunk, _score(chunk.texts))
        chunks += 1
    assert chunks == 8
    assert queue.workers(job) == {"w1": 8}
    status = queue.status(job)
    assert status is not None and status["status"] == "done" and status["done"] == 1000 and status["finished_at"]
    results = list(queue.results(job, page=300))
    assert [r["index"] for r in results] == list(range(1000))
    assert [r["label"] for r in results] == ["positive" if "good" in t else "negative" for t in texts]
    with queue.engine.connect() as conn:  # texts are kept only until scored
        assert conn.execute(sa.text("SELECT count(*) FROM job_texts")).scalar() == 0


def test_concurrent_workers_never_lease_the_same_chunk(queue: JobQueue) -> None:
    job = queue.submit([f"good {i}" for i in range(2000)], "m:1", "c", chunk_texts=50)
    taken: list[tuple[str, int]] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while (chunk := queue.claim(name, timedelta(seconds=60))) is not None:
            with lock:
                taken.append((chunk.job_id, chunk.chunk))
            queue.complete(chunk, _score(chunk.texts))

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(c for _, c in taken) == list(range(40))  # each chunk once
    assert queue.status(job)["done"] == 2000  # type: ignore[index]


def test_a_chunk_whose_lease_ran_out_is_taken_again_and_counted_once(queue: JobQueue) -> None:
    job = queue.submit([f"good {i}" for i in range(10)], "m:1", "c", chunk_texts=10)
    dead = queue.claim("dies", timedelta(seconds=0.2))
    assert dead is not None and queue.claim("other", timedelta(seconds=30)) is None  # leased
    time.sleep(0.4)
    again = queue.claim("other", timedelta(seconds=30))
    assert again is not None and (again.job_id, again.chunk) == (dead.job_id, dead.chunk)
    assert queue.complete(again, _score(again.texts))
    assert not queue.complete(dead, _score(dead.texts))  # the first worker, late: nothing counted twice
    status = queue.status(job)
    assert status is not None and status["done"] == 10 and status["status"] == "done"
    assert len(list(queue.results(job))) == 10


def test_a_stopping_worker_gives_its_chunks_back_at_once(queue: JobQueue) -> None:
    job = queue.submit([f"good {i}" for i in range(30)], "m:1", "c", chunk_texts=10)
    first = queue.claim("stops", timedelta(minutes=10))
    second = queue.claim("stops", timedelta(minutes=10))
    third = queue.claim("stays", timedelta(minutes=10))
    assert first is not None and second is not None and third is not None
    assert queue.claim("other", timedelta(seconds=30)) is None  # all three leased for 10 minutes
    assert queue.release("stops") == 2
    again = [queue.claim("other", timedelta(seconds=30)) for _ in range(3)]
    # the released chunks, oldest first, without waiting for their leases; the other worker's stays
    assert [(c.job_id, c.chunk) for c in again if c] == [(job, first.chunk), (job, second.chunk)]
    assert queue.release("stops") == 0


def test_cancel_stops_a_job_and_older_jobs_go_first(queue: JobQueue) -> None:
    first = queue.submit(["good a", "good b", "good c"], "m:1", "c", chunk_texts=1)
    second = queue.submit(["good d"], "m:1", "c", chunk_texts=1)
    chunk = queue.claim("w", timedelta(seconds=30))
    assert chunk is not None and chunk.job_id == first
    assert queue.cancel(first) == ("cancelled", True)
    assert queue.cancel(first) == ("cancelled", False)
    assert not queue.active(first)
    assert not queue.complete(chunk, _score(chunk.texts))  # the running chunk's results are refused
    nxt = queue.claim("w", timedelta(seconds=30))
    assert nxt is not None and nxt.job_id == second  # nothing of the cancelled job is claimable
    assert queue.cancel("no-such-job") == (None, False)
    assert queue.stats()["by_status"] == {"cancelled": 1, "running": 1}


def test_finished_jobs_expire_with_their_results(queue: JobQueue) -> None:
    queue.result_ttl = timedelta(seconds=-1)
    job = queue.submit(["good"], "m:1", "c")
    chunk = queue.claim("w", timedelta(seconds=30))
    assert chunk is not None and queue.complete(chunk, _score(chunk.texts))
    assert queue.expire() == 1
    assert queue.status(job) is None and list(queue.results(job)) == []
