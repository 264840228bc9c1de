"""prediction counts per hour and per minute, and covering indexes, for the analytics reports

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 01:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The start of each row's hour and minute as each dialect stores it: PostgreSQL truncates the
# timestamptz; SQLite keeps SQLAlchemy's text format, so the string is cut and padded.
PERIOD_START = {
    "postgresql": {60: "date_trunc('minute', created_at)", 3600: "date_trunc('hour', created_at)"},
    "sqlite": {
        60: "strftime('%Y-%m-%d %H:%M:00.000000', created_at)",
        3600: "strftime('%Y-%m-%d %H:00:00.000000', created_at)",
    },
}


def upgrade() -> None:
    op.create_table(
        "prediction_counts",
        sa.Column("period_s", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("endpoint", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("variant", sa.String(length=1), nullable=False),
        sa.Column("label", sa.String(length=16), nullable=False),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("score_sum", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("period_s", "period_start", "endpoint", "model", "variant", "label", "cached"),
    )
    with op.batch_alter_table("predictions") as batch_op:
        batch_op.drop_index("ix_predictions_variant_created_at")
        batch_op.drop_index("ix_predictions_created_at")
        batch_op.create_index("ix_predictions_created_at", ["created_at"], postgresql_include=["latency_ms"])
        batch_op.create_index(
            "ix_predictions_ab_created_at",
            ["created_at"],
            postgresql_include=["variant", "latency_ms", "label", "request_id"],
            postgresql_where=sa.text("variant IS NOT NULL"),
            sqlite_where=sa.text("variant IS NOT NULL"),
        )
    with op.batch_alter_table("feedback") as batch_op:
        batch_op.create_index("ix_feedback_created_at", ["created_at"])
    # Count the rows already stored, so the reports stay whole across the upgrade.
    for period, start in PERIOD_START[op.get_bind().dialect.name].items():
        op.execute(
            f"""
            INSERT INTO prediction_counts
                (period_s, period_start, endpoint, model, variant, label, cached, n, score_sum)
            SELECT {period}, {start}, endpoint, model, coalesce(variant, ''), label, cached, count(*), sum(score)
            FROM predictions
            GROUP BY {start}, endpoint, model, coalesce(variant, ''), label, cached
            """
        )


def downgrade() -> None:
    op.drop_table("prediction_counts")
    with op.batch_alter_table("feedback") as batch_op:
        batch_op.drop_index("ix_feedback_created_at")
    with op.batch_alter_table("predictions") as batch_op:
        batch_op.drop_index("ix_predictions_ab_created_at")
        batch_op.drop_index("ix_predictions_created_at")
        batch_op.create_index("ix_predictions_created_at", ["created_at"])
        batch_op.create_index("ix_predictions_variant_created_at", ["variant", "created_at"])
