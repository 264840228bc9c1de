"""The workers' side of the bulk-job queue: lease a chunk, keep, fail or give it back, complete it.

A worker leases a claimable chunk with `FOR UPDATE SKIP LOCKED` (concurrent workers never wait
on each other or take the same chunk; under SQLite one UPDATE statement holds the database's
write lock, which gives the same guarantee). A lease that runs out (its worker died) makes the
chunk claimable again; a chunk tried `max_attempts` times fails its job. Results are written with
ON CONFLICT DO NOTHING by (job, index), and a chunk is counted into the job's progress only by
the UPDATE that marks it done, so a chunk scored twice is stored and counted once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy import Engine

from storage.analytics.records import utcnow
from storage.analytics.writer import upsert
from storage.tables import job_chunks, job_results, job_texts, jobs

ACTIVE = ("queued", "running")


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


class ChunkLeases:
    """The queue as workers use it (JobQueue adds the clients' side and the upkeep)."""

    def __init__(self, engine: Engine, result_ttl: timedelta = timedelta(days=7)) -> None:
        self.engine = engine
        self.result_ttl = result_ttl
        self.postgres = engine.dialect.name == "postgresql"

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
