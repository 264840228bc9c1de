"""A finished bulk job written straight into a database: for tests and `make abuse`, which need
a job with many results (a long stream to read) without scoring them first."""

from __future__ import annotations

import hashlib
import uuid

import sqlalchemy as sa

from storage.analytics.records import utcnow
from storage.tables import job_results, jobs


def done_job(database_url: str, results: int, client: str = "198.18.2.1") -> tuple[str, str]:
    """A done job of `client` with `results` results: (its id, its token)."""
    job_id, token = str(uuid.uuid4()), uuid.uuid4().hex * 2
    now = utcnow()
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(
            jobs.insert().values(
                job_id=job_id,
                status="done",
                total=results,
                done=results,
                model="m:1",
                client=client,
                created_at=now,
                finished_at=now,
                expires_at=now.replace(year=now.year + 1),
                token_sha256=hashlib.sha256(token.encode()).hexdigest(),
            )
        )
        rows = [
            {"job_id": job_id, "idx": i, "label": "positive", "score": 0.9, "p_negative": 0.1, "p_positive": 0.9}
            for i in range(results)
        ]
        for at in range(0, results, 10_000):
            conn.execute(job_results.insert(), rows[at : at + 10_000])
    engine.dispose()
    return job_id, token
