"""The bulk-job queue in the analytics database: submit a job, follow it, read its results,
cancel it; expiry and the queue's gauges. The workers' side (leases) is storage/job_leases.py.

The standard PostgreSQL queue pattern: a job's texts are cut into chunks that workers lease, the
oldest chunk of the client served least recently first, so one client's large job does not hold
back another client's small one. Chosen over RQ or Celery: those add a broker process and a
second copy of the model outside the service's batcher (docs/decisions.md).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa

from storage.analytics.records import utcnow
from storage.job_leases import ACTIVE, ChunkLeases
from storage.tables import job_chunks, job_results, job_texts, jobs

CHUNK_TEXTS = 256
# Rows per INSERT statement when a job's texts are stored: read a batch at a time from the
# submission's texts (a file past its first MiB), so storing holds one batch in memory.
INSERT_ROWS = 2_000
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


class JobQueue(ChunkLeases):
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
