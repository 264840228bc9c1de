"""The bulk-job queue on real PostgreSQL and SQLite: leases, concurrency, idempotence, cancel,
ownership by token, quotas, fair turns between clients, and attempts that end."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from storage import migrate
from storage.db import make_engine
from storage.job_leases import Result
from storage.jobs import JobQueue, QuotaExceeded, Quotas

pytestmark = pytest.mark.integration
MODELS = ("m:1",)
TOKEN = "a" * 64  # a token's SHA-256 as the service stores it
OTHER = "b" * 64


def _submit(queue: JobQueue, texts: list[str], client: str = "c", **kwargs: object) -> str:
    return queue.submit(texts, "m:1", client, TOKEN, **kwargs)  # type: ignore[arg-type]


def _claim(queue: JobQueue, worker: str, lease: timedelta, max_attempts: int = 3):  # type: ignore[no-untyped-def]
    return queue.claim(worker, lease, MODELS, max_attempts)


@pytest.fixture(params=["postgresql", "sqlite"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> JobQueue:
    url = request.getfixturevalue("database_url") if request.param == "postgresql" else f"sqlite:///{tmp_path}/j.db"
    migrate.upgrade(url)
    return JobQueue(make_engine(url))


def _score(texts: list[str]) -> list[Result]:
    return [Result("positive", 0.9, 0.1, 0.9) if "good" in t else Result("negative", 0.8, 0.8, 0.2) for t in texts]


def test_a_job_is_scored_chunk_by_chunk_with_one_result_per_text_in_order(queue: JobQueue) -> None:
    texts = [f"{'good' if i % 3 else 'bad'} text {i}" for i in range(1000)]
    job = _submit(queue, texts, "203.0.113.1", chunk_texts=128)
    assert queue.status(job, TOKEN)["status"] == "queued"  # type: ignore[index]
    chunks = 0
    while (chunk := _claim(queue, "w1", timedelta(seconds=30))) is not None:
        assert queue.status(job, TOKEN)["status"] == "running"  # type: ignore[index]
        assert queue.complete(chunk, _score(chunk.texts))
        chunks += 1
    assert chunks == 8
    assert queue.workers(job) == {"w1": 8}
    status = queue.status(job, TOKEN)
    assert status is not None and status["status"] == "done" and status["done"] == 1000 and status["finished_at"]
    results = list(queue.results(job, page=300))
    assert [r["index"] for r in results] == list(range(1000))
    assert [r["label"] for r in results] == ["positive" if "good" in t else "negative" for t in texts]
    with queue.engine.connect() as conn:  # texts are kept only until scored
        assert conn.execute(sa.text("SELECT count(*) FROM job_texts")).scalar() == 0


def test_concurrent_workers_never_lease_the_same_chunk(queue: JobQueue) -> None:
    job = _submit(queue, [f"good {i}" for i in range(2000)], "c", chunk_texts=50)
    taken: list[tuple[str, int]] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while (chunk := _claim(queue, name, timedelta(seconds=60))) is not None:
            with lock:
                taken.append((chunk.job_id, chunk.chunk))
            queue.complete(chunk, _score(chunk.texts))

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(c for _, c in taken) == list(range(40))  # each chunk once
    assert queue.status(job, TOKEN)["done"] == 2000  # type: ignore[index]


def test_a_chunk_whose_lease_ran_out_is_taken_again_and_counted_once(queue: JobQueue) -> None:
    job = _submit(queue, [f"good {i}" for i in range(10)], "c", chunk_texts=10)
    dead = _claim(queue, "dies", timedelta(seconds=0.2))
    assert dead is not None and _claim(queue, "other", timedelta(seconds=30)) is None  # leased
    time.sleep(0.4)
    again = _claim(queue, "other", timedelta(seconds=30))
    assert again is not None and (again.job_id, again.chunk) == (dead.job_id, dead.chunk)
    assert queue.complete(again, _score(again.texts))
    assert not queue.complete(dead, _score(dead.texts))  # the first worker, late: nothing counted twice
    status = queue.status(job, TOKEN)
    assert status is not None and status["done"] == 10 and status["status"] == "done"
    assert len(list(queue.results(job))) == 10


def test_a_stopping_worker_gives_its_chunks_back_at_once(queue: JobQueue) -> None:
    job = _submit(queue, [f"good {i}" for i in range(30)], "c", chunk_texts=10)
    first = _claim(queue, "stops", timedelta(minutes=10))
    second = _claim(queue, "stops", timedelta(minutes=10))
    third = _claim(queue, "stays", timedelta(minutes=10))
    assert first is not None and second is not None and third is not None
    assert _claim(queue, "other", timedelta(seconds=30)) is None  # all three leased for 10 minutes
    assert queue.release("stops") == 2
    again = [_claim(queue, "other", timedelta(seconds=30)) for _ in range(3)]
    # the released chunks, oldest first, without waiting for their leases; the other worker's stays
    assert [(c.job_id, c.chunk) for c in again if c] == [(job, first.chunk), (job, second.chunk)]
    assert queue.release("stops") == 0


def test_cancel_stops_a_job_and_older_jobs_go_first(queue: JobQueue) -> None:
    first = _submit(queue, ["good a", "good b", "good c"], "c", chunk_texts=1)
    second = _submit(queue, ["good d"], "c", chunk_texts=1)
    chunk = _claim(queue, "w", timedelta(seconds=30))
    assert chunk is not None and chunk.job_id == first
    assert queue.cancel(first, TOKEN) == ("cancelled", True)
    assert queue.cancel(first, TOKEN) == ("cancelled", False)
    assert not queue.active(first)
    assert not queue.complete(chunk, _score(chunk.texts))  # the running chunk's results are refused
    nxt = _claim(queue, "w", timedelta(seconds=30))
    assert nxt is not None and nxt.job_id == second  # nothing of the cancelled job is claimable
    assert queue.cancel("no-such-job", TOKEN) == (None, False)
    assert queue.stats()["by_status"] == {"cancelled": 1, "running": 1}


def test_finished_jobs_expire_with_their_results(queue: JobQueue) -> None:
    queue.result_ttl = timedelta(seconds=-1)
    job = _submit(queue, ["good"], "c")
    chunk = _claim(queue, "w", timedelta(seconds=30))
    assert chunk is not None and queue.complete(chunk, _score(chunk.texts))
    assert queue.expire() == 1
    assert queue.status(job, None) is None and list(queue.results(job)) == []


def test_a_job_left_without_texts_expires_and_frees_its_quota(queue: JobQueue) -> None:
    """A job row whose texts were never stored (the database gone between submit's two
    transactions) is removed after ORPHANED_AFTER; a job still storing its texts is kept."""
    from storage.analytics.records import utcnow
    from storage.jobs import ORPHANED_AFTER
    from storage.tables import job_chunks, job_texts, jobs

    quotas = Quotas(active_jobs_per_client=1, texts_per_client=10, texts=100)
    orphan, storing = _submit(queue, ["good"], "o"), _submit(queue, ["good"], "s")
    with queue.engine.begin() as conn:
        for table in (job_chunks, job_texts):
            conn.execute(table.delete().where(table.c.job_id.in_([orphan, storing])))
        conn.execute(jobs.update().where(jobs.c.job_id == orphan).values(created_at=utcnow() - ORPHANED_AFTER * 2))
    with pytest.raises(QuotaExceeded):
        queue.check_quotas("o", quotas)
    assert queue.expire() == 1
    assert queue.status(orphan, None) is None and queue.status(storing, None) is not None
    queue.check_quotas("o", quotas)  # its client may submit again


def test_a_job_answers_only_its_own_token_or_the_admin(queue: JobQueue) -> None:
    job = _submit(queue, ["good a", "good b"])
    assert queue.status(job, OTHER) is None and queue.status(job, "") is None
    assert queue.status(job, TOKEN) is not None and queue.status(job, None) is not None  # None: the admin
    assert queue.cancel(job, OTHER) == (None, False)
    assert queue.status(job, TOKEN)["status"] == "queued"  # type: ignore[index]
    assert queue.cancel(job, TOKEN) == ("cancelled", True)


def test_quotas_refuse_per_client_then_for_everyone_and_store_nothing(queue: JobQueue) -> None:
    quotas = Quotas(active_jobs_per_client=2, texts_per_client=10, texts=15)
    _submit(queue, ["good"] * 4, "a", quotas=quotas)
    _submit(queue, ["good"] * 4, "a", quotas=quotas)
    with pytest.raises(QuotaExceeded, match="MAX_ACTIVE_JOBS_PER_CLIENT") as jobs_cap:
        _submit(queue, ["good"], "a", quotas=quotas)
    assert jobs_cap.value.per_client
    with pytest.raises(QuotaExceeded, match="MAX_QUEUED_TEXTS_PER_CLIENT") as texts_cap:
        _submit(queue, ["good"] * 11, "b", quotas=quotas)
    assert texts_cap.value.per_client
    _submit(queue, ["good"] * 6, "b", quotas=quotas)  # 14 queued in all
    with pytest.raises(QuotaExceeded, match="MAX_QUEUED_TEXTS\\b") as everyone:
        _submit(queue, ["good"] * 2, "c", quotas=quotas)
    assert not everyone.value.per_client
    with queue.engine.connect() as conn:  # the refused jobs left nothing behind
        assert conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar() == 3
        assert conn.execute(sa.text("SELECT count(*) FROM job_texts")).scalar() == 14
    # scored work leaves the quota: a's first job done, a may submit again
    while (chunk := _claim(queue, "w", timedelta(seconds=30))) is not None:
        queue.complete(chunk, _score(chunk.texts))
    _submit(queue, ["good"] * 10, "a", quotas=quotas)


def test_clients_take_turns_chunk_by_chunk(queue: JobQueue) -> None:
    big = _submit(queue, [f"good big {i}" for i in range(8)], "a", chunk_texts=1)
    first = _claim(queue, "w", timedelta(seconds=30))
    assert first is not None and first.job_id == big
    small = _submit(queue, ["good small 1", "good small 2"], "b", chunk_texts=1)  # behind the big job
    order = []
    queue.complete(first, _score(first.texts))
    while (chunk := _claim(queue, "w", timedelta(seconds=30))) is not None:
        order.append("big" if chunk.job_id == big else "small")
        queue.complete(chunk, _score(chunk.texts))
    assert order[:4] == ["small", "big", "small", "big"], order
    assert queue.status(small, TOKEN)["status"] == "done"  # type: ignore[index]


def test_a_chunk_that_keeps_failing_fails_its_job_after_its_attempts(queue: JobQueue) -> None:
    job = _submit(queue, ["good a", "good b"])
    for attempt in (1, 2):
        chunk = _claim(queue, "w", timedelta(seconds=30))
        assert chunk is not None and chunk.attempt == attempt
        assert not queue.fail(chunk, "w", "RuntimeError: boom", max_attempts=3)  # queued again at once
    chunk = _claim(queue, "w", timedelta(seconds=30))
    assert chunk is not None and chunk.attempt == 3
    assert queue.fail(chunk, "w", "RuntimeError: boom", max_attempts=3)
    status = queue.status(job, TOKEN)
    assert status is not None and status["status"] == "failed" and status["finished_at"]
    assert "failed 3 times" in status["error"] and "RuntimeError: boom" in status["error"]
    assert _claim(queue, "w", timedelta(seconds=30)) is None


def test_a_chunk_whose_lease_runs_out_on_its_last_attempt_fails_its_job(queue: JobQueue) -> None:
    job = _submit(queue, ["good a"])
    assert _claim(queue, "dies", timedelta(seconds=0.2), max_attempts=1) is not None
    time.sleep(0.4)
    assert _claim(queue, "other", timedelta(seconds=30), max_attempts=1) is None
    status = queue.status(job, TOKEN)
    assert status is not None and status["status"] == "failed" and "lease ran out" in status["error"]


def test_jobs_of_a_model_not_served_are_left_to_others_then_failed(queue: JobQueue) -> None:
    job = queue.submit(["good"], "m:old", "c", TOKEN)
    assert _claim(queue, "w", timedelta(seconds=30)) is None  # this worker serves m:1 only
    assert queue.fail_unserved(MODELS, timedelta(hours=1)) == []  # not idle long enough
    assert queue.fail_unserved(MODELS, timedelta(seconds=0)) == [job]
    status = queue.status(job, TOKEN)
    assert status is not None and status["status"] == "failed" and "m:old is not served" in status["error"]


def test_expiry_removes_a_bounded_number_of_jobs_a_call(queue: JobQueue) -> None:
    queue.result_ttl = timedelta(seconds=-1)
    for i in range(5):
        _submit(queue, [f"good {i}"])
        chunk = _claim(queue, "w", timedelta(seconds=30))
        assert chunk is not None and queue.complete(chunk, _score(chunk.texts))
    assert [queue.expire(limit=2), queue.expire(limit=2), queue.expire(limit=2)] == [2, 2, 1]


def test_a_renewed_lease_keeps_a_slow_chunk_and_only_its_attempt_may_fail_it(queue: JobQueue) -> None:
    job = _submit(queue, ["good a"])
    slow = _claim(queue, "slow", timedelta(seconds=0.3), max_attempts=1)
    assert slow is not None
    for _ in range(3):  # scored for longer than its lease, renewed between sub-batches
        time.sleep(0.2)
        assert queue.renew(slow, "slow", timedelta(seconds=0.3))
    assert _claim(queue, "other", timedelta(seconds=30), max_attempts=1) is None  # still its own
    assert queue.status(job, TOKEN)["status"] == "running"  # type: ignore[index]
    time.sleep(0.4)  # now its lease runs out, and another worker takes the chunk (attempt 2)
    again = _claim(queue, "other", timedelta(seconds=30), max_attempts=2)
    assert again is not None and again.attempt == 2
    assert not queue.renew(slow, "slow", timedelta(seconds=30))  # the first worker stops
    assert not queue.fail(slow, "slow", "late failure", max_attempts=2)  # and its failure changes nothing
    assert queue.complete(again, _score(again.texts))
    assert queue.status(job, TOKEN)["status"] == "done"  # type: ignore[index]


def test_chunks_given_back_or_released_do_not_use_up_attempts(queue: JobQueue) -> None:
    job = _submit(queue, ["good a"])
    for _ in range(3):
        chunk = _claim(queue, "w", timedelta(seconds=30), max_attempts=1)
        assert chunk is not None and chunk.attempt == 1
        queue.give_back(chunk, "w")  # the database failed the worker, not the chunk
    assert _claim(queue, "stops", timedelta(seconds=30), max_attempts=1) is not None
    assert queue.release("stops") == 1  # a graceful stop
    last = _claim(queue, "w", timedelta(seconds=30), max_attempts=1)
    assert last is not None and last.attempt == 1 and queue.complete(last, _score(last.texts))
    assert queue.status(job, TOKEN)["status"] == "done"  # type: ignore[index]


def test_a_sole_claim_first_queues_again_a_chunk_its_worker_never_saw_claimed(queue: JobQueue) -> None:
    """A worker holding no chunk claims with sole=True: a chunk leased in its name is from a claim
    whose answer it lost (the call timed out), queued again in its place without an attempt."""
    job = _submit(queue, [f"good {i}" for i in range(20)], "c", chunk_texts=10)
    lost = _claim(queue, "w", timedelta(minutes=10))
    assert lost is not None and lost.attempt == 1
    again = queue.claim("w", timedelta(seconds=30), MODELS, 3, sole=True)
    assert again is not None and (again.chunk, again.attempt) == (lost.chunk, 1)  # the oldest chunk, uncounted
    other = queue.claim("x", timedelta(seconds=30), MODELS, 3, sole=True)  # another worker's lease is left alone
    assert other is not None and other.chunk != again.chunk
    assert queue.complete(again, _score(again.texts)) and queue.complete(other, _score(other.texts))
    assert queue.status(job, TOKEN)["status"] == "done"  # type: ignore[index]
