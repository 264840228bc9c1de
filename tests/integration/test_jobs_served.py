"""Bulk jobs on real `bentoml serve` instances, Redis and PostgreSQL: a worker killed, the
service restarted, two replicas sharing a job, two jobs at once. Each ends with exactly one
result per text, in input order."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import sqlalchemy as sa

from storage import migrate
from tests.support.servers import PostgresServer, RedisServer
from tests.support.serving import Served, post_retrying_sheds

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# Shorter than the default (30 s) so that a dead worker's chunk is taken again within the test;
# still far above the second or two a 256-text chunk takes on a busy 2-core machine.
LEASE_SECONDS = 10
FINISH_TIMEOUT = 300
# Texts of a job differ in their words as well as in their numbers, so that their scores differ
# too (a result stored at another text's index shows).
PHRASES = (
    "A wonderful, delightful film with a moving ending",
    "The food was cold and the waiter ignored us all evening",
    "Solid build quality; I would buy it again",
    "Delivery took three weeks and the box arrived crushed",
    "Friendly staff, clean rooms and a view worth every penny",
    "The plot drags and the jokes fall flat",
    "Exactly what I needed and the battery lasts for days",
    "I want my money back; the screen cracked on day two",
)


@pytest.fixture(scope="module")
def jobs_db(postgres_server: PostgresServer) -> Iterator[str]:
    """A database of this module's own on the session's PostgreSQL, migrated."""
    name = f"jobs_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_server.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.make_url(postgres_server.url).set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(scope="module")
def db(jobs_db: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(jobs_db)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def jobs_env(model_env: dict[str, str], bentoml_home: Path, redis_server: RedisServer, jobs_db: str) -> dict[str, str]:
    return {
        "BENTOML_HOME": str(bentoml_home),
        **model_env,
        "REDIS_URL": redis_server.url,
        "DATABASE_URL": jobs_db,
        "TRUSTED_PROXIES": "127.0.0.1",
        "JOB_LEASE_SECONDS": str(LEASE_SECONDS),
        # the tests poll a job every 50 ms: far past the default read limit, which is not tested here
        "RATE_LIMIT_JOB_READS": "0",
    }


def _replica(env: dict[str, str], folder: Path) -> Served:
    """An instance with a spill folder of its own, as each replica of a deployment has."""
    folder.mkdir(parents=True, exist_ok=True)
    return Served({**env, "SPILL_DIR": str(folder / "spill")}, folder / "serve.log", workers=2)


@pytest.fixture(scope="module")
def stack(jobs_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One instance, two workers, on this session's Redis and this module's database."""
    with _replica(jobs_env, tmp_path_factory.mktemp("jobs-stack")) as server:
        yield server


# --- helpers --------------------------------------------------------------------------------


def _texts(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"{PHRASES[i % len(PHRASES)]} (review {i}, run {tag})" for i in range(n)]


# The token of each job submitted here, by job id (any replica answers it).
TOKENS: dict[str, str] = {}


def _submit(url: str, texts: list[str], client: str) -> str:
    r = post_retrying_sheds(f"{url}/jobs", {"texts": texts}, {"X-Forwarded-For": client})
    assert r.status_code == 202, r.text
    assert r.json()["total"] == len(texts)
    TOKENS[r.json()["job_id"]] = r.json()["token"]
    return str(r.json()["job_id"])


def _auth(job_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[job_id]}"}


def _progress(url: str, job_id: str) -> dict:
    r = httpx.get(f"{url}/jobs/{job_id}", timeout=30, headers=_auth(job_id))
    assert r.status_code == 200, r.text
    return dict(r.json())


def _wait(url: str, job_id: str, until: Callable[[dict], bool], timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        progress = _progress(url, job_id)
        if until(progress):
            return progress
        status = progress["status"]
        assert status in ("queued", "running"), f"job {status}: {progress.get('error')} ({progress})"
        assert time.monotonic() < deadline, f"{what} not reached in {timeout:.0f} s: {progress}"
        time.sleep(0.05)


def _wait_finished(url: str, job_id: str) -> dict:
    return _wait(url, job_id, lambda p: p["status"] == "done", FINISH_TIMEOUT, "job done")


def _mid_job(p: dict) -> bool:
    return 0 < p["done"] < p["total"]


def _results(url: str, job_id: str) -> list[dict]:
    r = httpx.get(f"{url}/jobs/{job_id}/results", timeout=120, headers=_auth(job_id))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in r.text.splitlines()]


def _assert_complete(url: str, job_id: str, n: int) -> list[dict]:
    """Done, with done == total == n, and exactly one well-formed result per text, in order."""
    progress = _progress(url, job_id)
    assert (progress["status"], progress["done"], progress["total"]) == ("done", n, n), progress
    assert progress["finished_at"], progress
    results = _results(url, job_id)
    assert [r["index"] for r in results] == list(range(n))
    for r in results:
        assert r["label"] in ("positive", "negative") and r["score"] == r["probabilities"][r["label"]], r
    return results


def _assert_results_are_the_texts(url: str, texts: list[str], results: list[dict], client: str) -> None:
    """The result at index i is text i's: a job fills the prediction cache, so /batch of a sample
    of the texts answers from the cache with the very probabilities the job stored for them."""
    sample = sorted({round(i * (len(texts) - 1) / 63) for i in range(64)})
    r = post_retrying_sheds(f"{url}/batch", {"texts": [texts[i] for i in sample]}, {"X-Forwarded-For": client})
    assert r.status_code == 200, r.text
    answers = r.json()["predictions"]
    assert all(a["cached"] for a in answers)
    assert [a["probabilities"] for a in answers] == [results[i]["probabilities"] for i in sample]


def _workers(server: Served) -> list[psutil.Process]:
    """The BentoML worker processes of `server`: its descendants that load the service."""
    assert server.proc is not None
    parent = psutil.Process(server.proc.pid)
    return [p for p in parent.children(recursive=True) if "_bentoml_impl.worker" in " ".join(p.cmdline())]


def _worker_id(pid: int) -> str:
    """The process a worker's lease names (service/jobs.py: `<hostname>-<pid>-<random>`)."""
    return f"{os.uname().nodename}-{pid}"


def _process(worker: str | None) -> str | None:
    """The `<hostname>-<pid>` of a lease's worker name: without its random part."""
    return worker.rsplit("-", 1)[0] if worker else worker


def _chunks(db: sa.Engine, job_id: str) -> list[sa.Row]:
    with db.connect() as conn:
        return list(
            conn.execute(
                sa.text("SELECT chunk, state, worker, attempts FROM job_chunks WHERE job_id = :j ORDER BY chunk"),
                {"j": job_id},
            ).all()
        )


def _leased_by(db: sa.Engine, job_id: str, worker: str) -> list[int]:
    return [c.chunk for c in _chunks(db, job_id) if c.state == "leased" and _process(c.worker) == worker]


def _analytics_rows(db: sa.Engine, job_id: str) -> int:
    """Analytics rows of the job's texts (service/jobs.py: request id `<job id[:24]>-<index>`)."""
    with db.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM predictions WHERE endpoint = '/jobs' AND request_id LIKE :p"),
                {"p": f"{job_id[:24]}-%"},
            ).scalar_one()
        )


def _wait_dead(process: psutil.Process, timeout: float = 30) -> None:
    """Until `process` runs no more. Not until it is gone: BentoML's arbiter reaps a killed
    worker only seconds later, longer than a lease at times."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.02)
    raise AssertionError(f"worker {process.pid} still runs {timeout:.0f} s after SIGKILL")


def _live_workers(server: Served) -> list[psutil.Process]:
    live = []
    for p in _workers(server):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                live.append(p)
        except psutil.NoSuchProcess:
            continue
    return live


def _kill_a_worker_holding_a_lease(server: Served, db: sa.Engine, url: str, job_id: str) -> tuple[str, list[int]]:
    """SIGKILL a worker while it holds a lease on one of the job's chunks; its id and those chunks.

    Each worker is frozen (SIGSTOP) before its leases are read, so they cannot change between the
    read and the kill; a worker holding none is let go again. A lease still held just after the
    kill is the dead worker's for good (until it runs out: the check comes well before that)."""
    deadline = time.monotonic() + 60
    seen: list[str] = []  # what each round found, for the message of a failure
    while time.monotonic() < deadline:
        progress = _progress(url, job_id)
        assert progress["status"] != "done", f"the job finished before a worker could be killed: {progress}, {seen}"
        if not _mid_job(progress):
            time.sleep(0.05)
            continue
        for worker in _live_workers(server):
            name = _worker_id(worker.pid)
            held: list[int] = []
            worker.suspend()
            try:
                held = _leased_by(db, job_id, name)
            finally:
                if not held:
                    worker.resume()
            seen.append(f"done {progress['done']}: {name} leases {held}")
            if not held:
                continue
            worker.kill()
            _wait_dead(worker)
            time.sleep(0.3)  # a commit sent just before the freeze lands, or not
            orphans = [c for c in _leased_by(db, job_id, name) if c in held]
            if orphans:
                return name, orphans
            seen.append(f"{name} killed, its lease gone: {_chunks(db, job_id)}")
        time.sleep(0.05)
    raise AssertionError(f"no worker held a lease on the job's chunks for 60 s: {seen}")


# --- the tests ------------------------------------------------------------------------------


def test_a_job_submitted_to_one_replica_is_scored_by_both_and_answered_by_either(
    stack: Served, jobs_env: dict[str, str], db: sa.Engine, tmp_path: Path
) -> None:
    n = 6000  # 24 chunks: every worker of both replicas claims some
    texts = _texts(n)
    second = _replica(jobs_env, tmp_path / "second")
    try:  # the stop is registered before the start: a start that times out is stopped too
        second.start()
        job_id = _submit(stack.url, texts, "203.0.113.31")
        _wait_finished(second.url, job_id)
        results = _assert_complete(second.url, job_id, n)
        scorers = {_process(c.worker) for c in _chunks(db, job_id)}
        first_ids = {_worker_id(p.pid) for p in _live_workers(stack)}
        second_ids = {_worker_id(p.pid) for p in _live_workers(second)}
    finally:
        second.stop()
    assert len(first_ids) == len(second_ids) == 2, (first_ids, second_ids)
    assert {c.state for c in _chunks(db, job_id)} == {"done"}
    assert scorers <= first_ids | second_ids, scorers
    assert scorers & first_ids, f"no chunk scored by the replica that took the job: {scorers}"
    assert scorers & second_ids, f"no chunk scored by the other replica: {scorers}"
    assert _results(stack.url, job_id) == results  # and the first replica serves the same results


def test_two_concurrent_jobs_from_two_clients_both_finish_complete(stack: Served) -> None:
    sizes = {"203.0.113.41": 1500, "203.0.113.42": 1100}
    texts = {client: _texts(n) for client, n in sizes.items()}
    with cf.ThreadPoolExecutor(2) as pool:
        jobs = dict(zip(sizes, pool.map(lambda c: _submit(stack.url, texts[c], c), sizes), strict=True))
    assert len(set(jobs.values())) == 2
    for client, job_id in jobs.items():
        _wait_finished(stack.url, job_id)
        results = _assert_complete(stack.url, job_id, sizes[client])
        _assert_results_are_the_texts(stack.url, texts[client], results, client)


def test_a_worker_killed_mid_job_leaves_its_chunk_to_another_and_nothing_twice(stack: Served, db: sa.Engine) -> None:
    n = 3000
    job_id = _submit(stack.url, _texts(n), "203.0.113.21")
    dead, orphans = _kill_a_worker_holding_a_lease(stack, db, stack.url, job_id)
    _wait_finished(stack.url, job_id)  # after the dead worker's lease ran out
    _assert_complete(stack.url, job_id, n)
    taken_again = [c for c in _chunks(db, job_id) if c.chunk in orphans]
    assert taken_again and all(
        c.state == "done" and _process(c.worker) != dead and c.attempts >= 2 for c in taken_again
    ), (
        dead,
        taken_again,
    )
    # one analytics row per text: the dead worker's rows shipped from its log by a survivor, and
    # the texts it had scored before dying, scored again, recorded once
    deadline = time.monotonic() + 90
    while (rows := _analytics_rows(db, job_id)) < n and time.monotonic() < deadline:
        time.sleep(0.5)
    assert rows == n
    # BentoML replaced the dead worker
    deadline = time.monotonic() + 120
    while len(names := {_worker_id(p.pid) for p in _live_workers(stack)}) < 2 or dead in names:
        assert time.monotonic() < deadline, f"the dead worker was not replaced: {names}"
        time.sleep(0.5)
    httpx.get(f"{stack.url}/readyz", timeout=30).raise_for_status()


def test_a_job_survives_a_restart_of_the_whole_service(
    jobs_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    """On a database of its own: no other instance of this module takes the job's chunks meanwhile.
    Leases far longer than the test may take: the job finishes only if the stopping workers give
    their chunks back."""
    n = 8000
    texts = _texts(n)
    env = {**jobs_env, "DATABASE_URL": database_url, "JOB_LEASE_SECONDS": str(3600)}
    served = _replica(env, tmp_path / "restarted")
    db = sa.create_engine(database_url)
    try:
        served.start()
        job_id = _submit(served.url, texts, "203.0.113.51")
        _wait(served.url, job_id, _mid_job, FINISH_TIMEOUT, "some progress")
        served.stop()  # SIGTERM, as an orchestrator would
        with db.connect() as conn:
            status, done = conn.execute(sa.text("SELECT status, done FROM jobs WHERE job_id = :j"), {"j": job_id}).one()
        assert status == "running" and 0 < done < n, (status, done)
        stopped = _chunks(db, job_id)
        assert not [c for c in stopped if c.state == "leased"], stopped  # given back on the way out
        left = {c.chunk for c in stopped if c.state != "done"}
        served.start()  # the same environment, the same database
        _wait_finished(served.url, job_id)
        results = _assert_complete(served.url, job_id, n)
        _assert_results_are_the_texts(served.url, texts, results, "203.0.113.52")
        restarted = {_worker_id(p.pid) for p in _live_workers(served)}
        taken_again = [c for c in _chunks(db, job_id) if c.chunk in left]
    finally:
        served.stop()
        db.dispose()
    # the chunks left at the stop were scored by the new workers
    assert taken_again and all(c.state == "done" and _process(c.worker) in restarted for c in taken_again), (
        restarted,
        taken_again,
    )
