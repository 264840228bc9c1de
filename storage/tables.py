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
Index("ix_predictions_created_at", predictions.c.created_at)
Index("ix_predictions_variant_created_at", predictions.c.variant, predictions.c.created_at)

# Per-minute counts of `predictions`, written in the same transaction as the rows they count
# (only rows actually inserted are counted, so a replayed row is never counted twice). The
# reports read whole minutes from here and only the window's first partial minute from
# `predictions`, so their cost follows the window's length in minutes, not its row count.
prediction_counts = Table(
    "prediction_counts",
    metadata,
    Column("minute", DateTime(timezone=True), primary_key=True),
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

request_errors = Table(
    "request_errors",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("endpoint", String(32), nullable=False),
    Column("status", Integer, nullable=False),
)
Index("ix_request_errors_created_at", request_errors.c.created_at)
