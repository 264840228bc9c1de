"""The bulk-job queue in the analytics database: submit, lease a chunk, complete it, follow it.

The standard PostgreSQL queue pattern: a job's texts are cut into chunks, and a worker leases
a claimable chunk with `FOR UPDATE SKIP LOCKED` (concurrent workers never wait on each
other or take the same chunk; under SQLite one UPDATE statement holds the database's write lock,
which gives the same guarantee): the oldest chunk of the client served least recently, so one
client's large job does not hold back another client's small one. A lease that runs out (its
worker died) makes the chunk claimable again; a chunk tried `max_attempts` times fails its
job. Results are written with ON CONFLICT DO NOTHING by (job, index), and a chunk is counted
into the job's progress only by the UPDATE that marks it done, so a chunk scored twice is
stored and counted once. Chosen over RQ or Celery: those add a broker process and a second
copy of the model outside the service's batcher (README, Bulk jobs).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy import Engine

from storage.analytics.records import utcnow
from storage.analytics.writer import upsert
from storage.tables import job_chunks, job_results, job_texts, jobs

CHUNK_TEXTS = 256
# Rows per INSERT statement when a job's texts are stored: read a batch at a time from the
# submission's texts (a file past its first MiB), so storing holds one batch in memory.
INSERT_ROWS = 2_000
ACTIVE = ("queued", "running")
# Taken (transaction-scoped) by every submission on PostgreSQL, so two replicas cannot both pass
# a quota with the other's job uncommitted. Under SQLite the job's INSERT, made before the
# counts are read, holds the database's write lock instead.
SUBMIT_LOCK = 0x6A6F6273  # "jobs"
# A queued job still without chunks after this long lost its texts (expire removes it): storing
# them takes seconds once the body has arrived, and the body has JOB_UPLOAD_TIMEOUT_SECONDS.
ORPHANED_AFTER = timedelta(hours=1)


class Texts(Protocol):
    """A job's texts: counted, then read once in order (a list, or the service's spooled file)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[str]: ...


@dataclass(frozen=True)
class Quotas:
    """How much queued work one client, and all clients, may have in the queue."""

    active_jobs_per_client: int
    texts_per_client: int
    texts: int


class QuotaExceeded(Exception):
    """A submission over a quota; `per_client` tells which kind (the client's, or everyone's)."""

    def __init__(self, message: str, per_client: bool) -> None:
        super().__init__(message)
        self.per_client = per_client


@dataclass(frozen=True)
class Chunk:
    """A leased chunk: its job, position and texts (index i of `texts` is `first + i` in the job)."""

    job_id: str
    chunk: int
    first: int
    texts: list[str]
    model: str
    attempt: int = 1


@dataclass(frozen=True)
class Result:
    label: str
    score: float
    p_negative: float
    p_positive: float


class JobQueue:
    def __init__(self, engine: Engine, result_ttl: timedelta = timedelta(days=7)) -> None:
        self.engine = engine
        self.result_ttl = result_ttl
        self.postgres = engine.dialect.name == "postgresql"

    # --- clients ---------------------------------------------------------------------------

    def submit(
        self,
        texts: Texts,
        model: str,
        client: str,
        token_sha256: str,
        quotas: Quotas | None = None,
        chunk_texts: int = CHUNK_TEXTS,
    ) -> str:
        """Store a job and its chunks in one transaction; returns its id. QuotaExceeded (and
        nothing stored) when it would take its client, or everyone, over `quotas`."""
        job_id = str(uuid.uuid4())
        now = utcnow()
        client = client[:64]
        # First the job alone, under the lock, checked against the quotas and committed: from
        # then on it counts in every quota, and the lock is not held while its texts are stored
        # (up to MAX_JOB_TEXTS of them). Without chunks yet, no worker takes it.
        with self.engine.begin() as conn:
            if self.postgres:
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(SUBMIT_LOCK)))
            conn.execute(
                jobs.insert().values(
                    job_id=job_id,
                    status="queued",
                    total=len(texts),
                    done=0,
                    model=model,
                    client=client,
                    created_at=now,
                    token_sha256=token_sha256,
                )
            )
            if quotas is not None:
                self._check_quotas(conn, client, quotas)  # the job just inserted counted in
        try:
            with self.engine.begin() as conn:
                items = iter(texts)
                for start in range(0, len(texts), INSERT_ROWS):
                    rows = [
                        {"job_id": job_id, "idx": start + i, "text": t}
                        for i, t in enumerate(itertools.islice(items, INSERT_ROWS))
                    ]
                    conn.execute(job_texts.insert(), rows)
                chunks = [
                    {
                        "job_id": job_id,
                        "chunk": n,
                        "first": first,
                        "size": min(chunk_texts, len(texts) - first),
                        "queued_at": now,
                        "state": "queued",
                        "attempts": 0,
                    }
                    for n, first in enumerate(range(0, len(texts), chunk_texts))
                ]
                conn.execute(job_chunks.insert(), chunks)
        except BaseException:
            with self.engine.begin() as conn:  # the job was not stored after all
                conn.execute(jobs.delete().where(jobs.c.job_id == job_id))
            raise
        return job_id

    def check_quotas(self, client: str, quotas: Quotas) -> None:
        """QuotaExceeded if `client` may not submit even a one-text job now: checked before a
        body is read, so a client at its quota is refused without sending it (submit checks
        again, with the job's texts counted)."""
        with self.engine.connect() as conn:
            self._check_quotas(conn, client[:64], quotas, extra_jobs=1, extra_texts=1)

    @staticmethod
    def _check_quotas(
        conn: sa.Connection, client: str, quotas: Quotas, extra_jobs: int = 0, extra_texts: int = 0
    ) -> None:
        waiting = sa.func.coalesce(sa.func.sum(jobs.c.total - jobs.c.done), 0)
        active = jobs.c.status.in_(ACTIVE)
        mine = conn.execute(sa.select(sa.func.count(), waiting).where(active, jobs.c.client == client)).one()
        n_jobs, n_texts = mine[0] + extra_jobs, mine[1] + extra_texts
        if n_jobs > quotas.active_jobs_per_client:
            raise QuotaExceeded(
                f"client has {n_jobs - 1} queued or running jobs, at most {quotas.active_jobs_per_client}"
                " (MAX_ACTIVE_JOBS_PER_CLIENT)",
                per_client=True,
            )
        if n_texts > quotas.texts_per_client:
            raise QuotaExceeded(
                f"client would have {n_texts} texts queued, at most {quotas.texts_per_client}"
                " (MAX_QUEUED_TEXTS_PER_CLIENT)",
                per_client=True,
            )
        everyone = conn.execute(sa.select(waiting).where(active)).scalar_one() + extra_texts
        if everyone > quotas.texts:
            raise QuotaExceeded(
                f"the service has too many texts queued ({everyone} with this job, at most {quotas.texts},"
                " MAX_QUEUED_TEXTS)",
                per_client=False,
            )

    @staticmethod
    def _owned(job_id: str, token_sha256: str | None) -> sa.ColumnElement[bool]:
        """The job, if `token_sha256` is its token's hash; None stands for the admin (any job)."""
        if token_sha256 is None:
            return jobs.c.job_id == job_id
        return sa.and_(jobs.c.job_id == job_id, jobs.c.token_sha256 == token_sha256)

    def status(self, job_id: str, token_sha256: str | None) -> dict[str, Any] | None:
        """The job's progress; None if there is no such job or the token is not its own."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(self._owned(job_id, token_sha256))).mappings().first()
        if row is None:
            return None
        return {
            "job_id": row["job_id"],
            "status": row["status"],
            "total": row["total"],
            "done": row["done"],
            "created_at": _iso(row["created_at"]),
            "finished_at": _iso(row["finished_at"]),
            "eta_seconds": _eta(row),
            "model": row["model"],
            "error": row["error"],
        }

    def results_page(self, job_id: str, after: int, page: int) -> list[dict[str, Any]]:
        """Up to `page` of the job's results after index `after`, in input order."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(job_results)
                .where(job_results.c.job_id == job_id, job_results.c.idx > after)
                .order_by(job_results.c.idx)
                .limit(page)
            ).all()
        return [
            {
                "index": r.idx,
                "label": r.label,
                "score": r.score,
                "probabilities": {"negative": r.p_negative, "positive": r.p_positive},
            }
            for r in rows
        ]

    def results(self, job_id: str, page: int = 5_000) -> Iterator[dict[str, Any]]:
        """The job's results in input order, read a page at a time."""
        last = -1
        while rows := self.results_page(job_id, last, page):
            yield from rows
            if len(rows) < page:
                return
            last = rows[-1]["index"]

    def cancel(self, job_id: str, token_sha256: str | None) -> tuple[str | None, bool]:
        """Cancel a queued or running job (its texts and unclaimed chunks go at once; a leased
        chunk's worker stops at its next sub-batch). Returns its status now (None if unknown,
        or the token is not its own) and whether this call cancelled it."""
        with self.engine.begin() as conn:
            status = conn.execute(sa.select(jobs.c.status).where(self._owned(job_id, token_sha256))).scalar()
            if status not in ACTIVE:
                return status, False
            if not self._finish(conn, job_id, "cancelled"):  # finished meanwhile
                return conn.execute(sa.select(jobs.c.status).where(jobs.c.job_id == job_id)).scalar(), False
        return "cancelled", True

    def _finish(self, conn: sa.Connection, job_id: str, status: str, error: str | None = None) -> bool:
        """End an active job as `status`: its texts and chunks go, its results stay until it expires.
        Its chunk rows are locked first, in the order claim and complete lock them (chunk, then
        job), so ending a job never deadlocks with a worker claiming or completing its chunk."""
        now = utcnow()
        if self.postgres:
            conn.execute(sa.select(job_chunks.c.chunk).where(job_chunks.c.job_id == job_id).with_for_update())
        ended = conn.execute(
            jobs.update()
            .where(jobs.c.job_id == job_id, jobs.c.status.in_(ACTIVE))
            .values(status=status, finished_at=now, expires_at=now + self.result_ttl, error=error)
        ).rowcount
        if ended:
            conn.execute(job_texts.delete().where(job_texts.c.job_id == job_id))
            conn.execute(job_chunks.delete().where(job_chunks.c.job_id == job_id))
        return bool(ended)

    # --- workers ---------------------------------------------------------------------------

    def claim(
        self, worker: str, lease: timedelta, models: Sequence[str], max_attempts: int, sole: bool = False
    ) -> Chunk | None:
        """Lease a claimable chunk (queued, or leased with its lease run out) of a job whose
        model is one of `models`: the oldest chunk of the client whose jobs were claimed least
        recently (never first), so clients take turns chunk by chunk. A chunk whose lease ran
        out on its last allowed attempt fails its job instead (its status says why), and the
        next chunk is looked at.

        `sole`: the worker holds no chunk while it claims, so a chunk leased in its name is one
        whose claim it never saw answered (the call timed out after it committed). Such a chunk
        is queued again first, its attempt not counted: left to run out, it would cost one."""
        now = utcnow()
        claimable = sa.or_(
            job_chunks.c.state == "queued", sa.and_(job_chunks.c.state == "leased", job_chunks.c.lease_until < now)
        )
        served = (
            sa.select(jobs.c.client, sa.func.max(jobs.c.claimed_at).label("last"))
            .where(jobs.c.status.in_(ACTIVE))
            .group_by(jobs.c.client)
            .subquery()
        )
        pick = (
            sa.select(job_chunks.c.job_id, job_chunks.c.chunk)
            .join(jobs, jobs.c.job_id == job_chunks.c.job_id)
            .join(served, served.c.client == jobs.c.client)
            .where(claimable, jobs.c.status.in_(ACTIVE), jobs.c.model.in_(list(models)))
            .order_by(
                served.c.last.asc().nulls_first(), job_chunks.c.queued_at, job_chunks.c.job_id, job_chunks.c.chunk
            )
            .limit(1)
        )
        if self.postgres:
            pick = pick.with_for_update(skip_locked=True, of=job_chunks)
        picked = pick.subquery()
        stmt = (
            job_chunks.update()
            .where(job_chunks.c.job_id == picked.c.job_id, job_chunks.c.chunk == picked.c.chunk, claimable)
            .values(state="leased", lease_until=now + lease, worker=worker[:64], attempts=job_chunks.c.attempts + 1)
            .returning(
                job_chunks.c.job_id, job_chunks.c.chunk, job_chunks.c.first, job_chunks.c.size, job_chunks.c.attempts
            )
        )
        for _ in range(8):  # past chunks that have used up their attempts
            with self.engine.begin() as conn:
                if sole:
                    conn.execute(_requeue(job_chunks.c.worker == worker[:64], job_chunks.c.state == "leased"))
                    sole = False
                row = conn.execute(stmt).first()
                if row is None:
                    return None
                if row.attempts > max_attempts:
                    error = _attempts_error(row.chunk, max_attempts, "its lease ran out")
                    self._finish(conn, row.job_id, "failed", error)
                    continue
                conn.execute(jobs.update().where(jobs.c.job_id == row.job_id).values(claimed_at=now))
                conn.execute(
                    jobs.update()
                    .where(jobs.c.job_id == row.job_id, jobs.c.status == "queued")
                    .values(status="running", started_at=now, progressed_at=now)
                )
                model = conn.execute(sa.select(jobs.c.model).where(jobs.c.job_id == row.job_id)).scalar_one()
                texts = (
                    conn.execute(
                        sa.select(job_texts.c.text)
                        .where(job_texts.c.job_id == row.job_id, job_texts.c.idx >= row.first)
                        .where(job_texts.c.idx < row.first + row.size)
                        .order_by(job_texts.c.idx)
                    )
                    .scalars()
                    .all()
                )
            if len(texts) < row.size:  # cancelled meanwhile: its texts are gone
                return None
            return Chunk(row.job_id, row.chunk, row.first, list(texts), model, row.attempts)
        return None

    def fail(self, chunk: Chunk, worker: str, reason: str, max_attempts: int) -> bool:
        """`worker`'s attempt at a chunk failed: back in the queue for another try, or, on its last
        allowed attempt, its job failed with `reason`. True when the job failed. Nothing happens
        when the chunk is no longer this attempt's (its lease ran out and another worker has it)."""
        with self.engine.begin() as conn:
            mine = conn.execute(
                job_chunks.update().where(_this_attempt(chunk, worker)).values(state="queued", lease_until=None)
            ).rowcount
            if mine and chunk.attempt >= max_attempts:
                return self._finish(conn, chunk.job_id, "failed", _attempts_error(chunk.chunk, max_attempts, reason))
        return False

    def renew(self, chunk: Chunk, worker: str, lease: timedelta) -> bool:
        """Extend `worker`'s lease of a chunk it is scoring; False once the job is no longer
        active or the chunk no longer this attempt's (its worker then stops)."""
        with self.engine.begin() as conn:
            renewed = conn.execute(
                job_chunks.update().where(_this_attempt(chunk, worker)).values(lease_until=utcnow() + lease)
            ).rowcount
            return bool(renewed) and self.active_in(conn, chunk.job_id)

    def give_back(self, chunk: Chunk, worker: str) -> None:
        """Queue a chunk again without counting the attempt: its worker could not finish it for
        a reason of its own (the database unavailable), not the chunk's."""
        with self.engine.begin() as conn:
            conn.execute(_requeue(_this_attempt(chunk, worker)))

    def fail_unserved(self, models: Sequence[str], idle: timedelta) -> list[str]:
        """Fail the active jobs whose model is not among `models` and that have not advanced
        for `idle`: no worker serving their model is left to take them. Their ids."""
        cutoff = utcnow() - idle
        with self.engine.begin() as conn:
            rows = conn.execute(
                sa.select(jobs.c.job_id, jobs.c.model).where(
                    jobs.c.status.in_(ACTIVE),
                    jobs.c.model.not_in(list(models)),
                    sa.func.coalesce(jobs.c.progressed_at, jobs.c.created_at) < cutoff,
                )
            ).all()
            failed = [
                r.job_id
                for r in rows
                if self._finish(
                    conn,
                    r.job_id,
                    "failed",
                    f"model {r.model} is not served: no worker scored this job for {idle.total_seconds():.0f} s;"
                    " submit it again",
                )
            ]
        return failed

    def release(self, worker: str) -> int:
        """Give a stopping worker's leased chunks back to the queue, in their place, so a restart
        does not wait for the leases to run out; the number of chunks released."""
        with self.engine.begin() as conn:
            return conn.execute(_requeue(job_chunks.c.worker == worker[:64], job_chunks.c.state == "leased")).rowcount

    def active(self, job_id: str) -> bool:
        """False once the job is cancelled (or gone): a worker stops scoring its chunk."""
        with self.engine.connect() as conn:
            status = conn.execute(sa.select(jobs.c.status).where(jobs.c.job_id == job_id)).scalar()
        return status in ACTIVE

    def complete(self, chunk: Chunk, results: Sequence[Result]) -> bool:
        """Store the chunk's results and count it done, once. True when this call counted it."""
        now = utcnow()
        rows = [
            {
                "job_id": chunk.job_id,
                "idx": chunk.first + i,
                "label": r.label,
                "score": r.score,
                "p_negative": r.p_negative,
                "p_positive": r.p_positive,
            }
            for i, r in enumerate(results)
        ]
        with self.engine.begin() as conn:
            if not self.active_in(conn, chunk.job_id):
                return False
            conn.execute(upsert(self.engine, job_results).on_conflict_do_nothing(), rows)
            counted = conn.execute(
                job_chunks.update()
                .where(job_chunks.c.job_id == chunk.job_id, job_chunks.c.chunk == chunk.chunk)
                .where(job_chunks.c.state != "done")
                .values(state="done", lease_until=None)
            ).rowcount
            if not counted:
                return False
            conn.execute(
                job_texts.delete()
                .where(job_texts.c.job_id == chunk.job_id, job_texts.c.idx >= chunk.first)
                .where(job_texts.c.idx < chunk.first + len(chunk.texts))
            )
            conn.execute(
                jobs.update()
                .where(jobs.c.job_id == chunk.job_id)
                .values(done=jobs.c.done + len(rows), progressed_at=now)
            )
            conn.execute(
                jobs.update()
                .where(jobs.c.job_id == chunk.job_id, jobs.c.done >= jobs.c.total, jobs.c.status.in_(ACTIVE))
                .values(status="done", finished_at=now, expires_at=now + self.result_ttl)
            )
        return True

    def workers(self, job_id: str) -> dict[str, int]:
        """Chunks scored by each worker (`host-pid`): kept until the job expires."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(job_chunks.c.worker, sa.func.count())
                .where(job_chunks.c.job_id == job_id, job_chunks.c.state == "done")
                .group_by(job_chunks.c.worker)
            ).all()
        return {str(w): int(n) for w, n in rows}

    @staticmethod
    def active_in(conn: sa.Connection, job_id: str) -> bool:
        return conn.execute(sa.select(jobs.c.status).where(jobs.c.job_id == job_id)).scalar() in ACTIVE

    # --- upkeep ----------------------------------------------------------------------------

    def expire(self, limit: int = 100) -> int:
        """Remove up to `limit` finished jobs past their time to live, with their results, and up
        to `limit` jobs left without chunks for ORPHANED_AFTER (submit stores a job, then its
        texts; a job whose texts failed to store and whose removal failed too, the database gone
        in between, would count in its client's quota for good). Returns how many (each worker
        calls it every minute: a bounded delete each time)."""
        now = utcnow()
        chunked = sa.select(job_chunks.c.job_id).where(job_chunks.c.job_id == jobs.c.job_id).exists()
        expired = jobs.c.expires_at < now
        orphaned = sa.and_(jobs.c.status == "queued", jobs.c.created_at < now - ORPHANED_AFTER, ~chunked)
        with self.engine.begin() as conn:
            gone = [
                job_id
                for which in (expired, orphaned)
                for job_id in conn.execute(sa.select(jobs.c.job_id).where(which).limit(limit)).scalars()
            ]
            for table in (job_results, job_texts, job_chunks, jobs):
                conn.execute(table.delete().where(table.c.job_id.in_(gone)))
        return len(gone)

    def stats(self) -> dict[str, Any]:
        """Jobs by status, and the age of the oldest queued or running job's last progress."""
        with self.engine.connect() as conn:
            by_status: dict[str, int] = dict(
                conn.execute(sa.select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)).all()
            )
            oldest = conn.execute(sa.select(sa.func.min(jobs.c.created_at)).where(jobs.c.status == "queued")).scalar()
            stalled = conn.execute(
                sa.select(sa.func.min(sa.func.coalesce(jobs.c.progressed_at, jobs.c.created_at))).where(
                    jobs.c.status.in_(ACTIVE)
                )
            ).scalar()
        now = utcnow()
        return {
            "by_status": by_status,
            "oldest_queued_seconds": _age(oldest, now),
            "least_recent_progress_seconds": _age(stalled, now),
        }


def _this_attempt(chunk: Chunk, worker: str) -> sa.ColumnElement[bool]:
    """The chunk's row while it is still `worker`'s lease of this attempt (fail, renew, give_back)."""
    return sa.and_(
        job_chunks.c.job_id == chunk.job_id,
        job_chunks.c.chunk == chunk.chunk,
        job_chunks.c.state == "leased",
        job_chunks.c.worker == worker[:64],
        job_chunks.c.attempts == chunk.attempt,
    )


def _requeue(*where: sa.ColumnElement[bool]) -> sa.Update:
    """Queue leased chunks again in their place, their attempt not counted: not their fault."""
    return (
        job_chunks.update().where(*where).values(state="queued", lease_until=None, attempts=job_chunks.c.attempts - 1)
    )


def _attempts_error(chunk: int, attempts: int, reason: str) -> str:
    return f"chunk {chunk} failed {attempts} times (JOB_MAX_ATTEMPTS), last: {reason[:500]}"


def _aware(value: datetime) -> datetime:
    # SQLite gives naive datetimes back (stored as UTC text); PostgreSQL aware ones.
    return value if value.tzinfo else value.replace(tzinfo=utcnow().tzinfo)


def _iso(value: datetime | None) -> str | None:
    return _aware(value).isoformat() if value else None


def _age(value: datetime | None, now: datetime) -> float:
    return max(0.0, (now - _aware(value)).total_seconds()) if value else 0.0


def _eta(row: Any) -> float | None:
    """Seconds to go at the rate so far; None before the first chunk or once finished."""
    if row["status"] != "running" or not row["started_at"] or not row["done"]:
        return None
    elapsed = (utcnow() - _aware(row["started_at"])).total_seconds()
    return round((row["total"] - row["done"]) * elapsed / row["done"], 1)
