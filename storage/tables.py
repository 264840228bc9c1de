"""The analytics schema. Alembic migrations (storage/migrations) are generated from this."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

predictions = Table(
    "predictions",
    metadata,
    Column("request_id", String(36), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("endpoint", String(32), nullable=False),
    Column("model", String(128), nullable=False),
    Column("variant", String(1), nullable=True),
    Column("label", String(16), nullable=False),
    Column("score", Float, nullable=False),
    Column("cached", Boolean, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("text_sha256", String(64), nullable=False),
    Column("text_length", Integer, nullable=False),
    # Only with STORE_TEXT=true; otherwise the hash and length above are all that is kept.
    Column("text", Text, nullable=True),
)
# Index-only scans for the reports: the window's latencies for the summary's percentiles, and
# the A/B rows (a fifth of all, say) by time, with what their latency and feedback queries read.
Index("ix_predictions_created_at", predictions.c.created_at, postgresql_include=["latency_ms"])
Index(
    "ix_predictions_ab_created_at",
    predictions.c.created_at,
    postgresql_include=["variant", "latency_ms", "label", "request_id"],
    postgresql_where=predictions.c.variant.is_not(None),
    sqlite_where=predictions.c.variant.is_not(None),
)

# Counts of `predictions` per hour and per minute, written in the same transaction as the rows
# they count (only rows actually inserted are counted, so a replayed row is never counted
# twice). The reports read whole hours and minutes from here and only the window's first,
# partial minute from `predictions`, so their cost follows the window's length, not its rows.
prediction_counts = Table(
    "prediction_counts",
    metadata,
    Column("period_s", Integer, primary_key=True, autoincrement=False),  # 60 or 3600
    Column("period_start", DateTime(timezone=True), primary_key=True),
    Column("endpoint", String(32), primary_key=True),
    Column("model", String(128), primary_key=True),
    Column("variant", String(1), primary_key=True),  # "" for requests outside the A/B test
    Column("label", String(16), primary_key=True),
    Column("cached", Boolean, primary_key=True),
    Column("n", BigInteger, nullable=False),
    Column("score_sum", Float, nullable=False),
)

feedback = Table(
    "feedback",
    metadata,
    Column("request_id", String(36), primary_key=True),
    Column("label", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
Index("ix_feedback_created_at", feedback.c.created_at)

request_errors = Table(
    "request_errors",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("endpoint", String(32), nullable=False),
    Column("status", Integer, nullable=False),
)
Index("ix_request_errors_created_at", request_errors.c.created_at)

# Bulk scoring jobs (storage/jobs.py). Any replica answers for any job, and every worker of every
# replica claims its chunks: the standard PostgreSQL queue, chunk rows leased with
# FOR UPDATE SKIP LOCKED (one UPDATE statement under SQLite's write lock there).
jobs = Table(
    "jobs",
    metadata,
    Column("job_id", String(36), primary_key=True),
    Column("status", String(16), nullable=False),  # queued, running, done, failed, cancelled
    Column("total", Integer, nullable=False),
    Column("done", Integer, nullable=False),
    Column("model", String(128), nullable=False),
    Column("client", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("progressed_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("error", Text, nullable=True),
    # SHA-256 of the job's bearer token (given to its submitter once): status, results and
    # cancel need the token. NULL for jobs submitted before tokens, reachable by the admin only.
    Column("token_sha256", String(64), nullable=True),
    # When a worker last leased a chunk of this job: chunks are claimed round robin between
    # clients, the least recently served client first (JobQueue.claim).
    Column("claimed_at", DateTime(timezone=True), nullable=True),
)
Index("ix_jobs_status_created_at", jobs.c.status, jobs.c.created_at)
Index("ix_jobs_expires_at", jobs.c.expires_at)
# The quotas count a client's queued and running jobs at every submission.
Index("ix_jobs_client_status", jobs.c.client, jobs.c.status)

# A job's texts in chunks of up to CHUNK_TEXTS: the unit a worker claims, under a lease.
job_chunks = Table(
    "job_chunks",
    metadata,
    Column("job_id", String(36), primary_key=True),
    Column("chunk", Integer, primary_key=True, autoincrement=False),
    Column("first", Integer, nullable=False),  # index of its first text in the job
    Column("size", Integer, nullable=False),
    Column("queued_at", DateTime(timezone=True), nullable=False),  # the job's: older jobs first
    Column("state", String(8), nullable=False),  # queued, leased, done
    Column("lease_until", DateTime(timezone=True), nullable=True),
    Column("worker", String(64), nullable=True),
    Column("attempts", Integer, nullable=False),
)
Index("ix_job_chunks_claim", job_chunks.c.state, job_chunks.c.queued_at, job_chunks.c.chunk)

# A job's texts, kept only until their chunk is scored.
job_texts = Table(
    "job_texts",
    metadata,
    Column("job_id", String(36), primary_key=True),
    Column("idx", Integer, primary_key=True, autoincrement=False),
    Column("text", Text, nullable=False),
)

# One result per text, written idempotently by (job, index); no text kept.
job_results = Table(
    "job_results",
    metadata,
    Column("job_id", String(36), primary_key=True),
    Column("idx", Integer, primary_key=True, autoincrement=False),
    Column("label", String(16), nullable=False),
    Column("score", Float, nullable=False),
    Column("p_negative", Float, nullable=False),
    Column("p_positive", Float, nullable=False),
)
