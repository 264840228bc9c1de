"""per-minute prediction counts for the analytics reports

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

# The minute as each dialect stores it: PostgreSQL truncates the timestamptz; SQLite keeps
# SQLAlchemy's text format, so the seconds are replaced in the string.
MINUTE = {
    "postgresql": "date_trunc('minute', created_at)",
    "sqlite": "strftime('%Y-%m-%d %H:%M:00.000000', created_at)",
}


def upgrade() -> None:
    op.create_table(
        "prediction_counts",
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("endpoint", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("variant", sa.String(length=1), nullable=False),
        sa.Column("label", sa.String(length=16), nullable=False),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("score_sum", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("minute", "endpoint", "model", "variant", "label", "cached"),
    )
    # Count the rows already stored, so the reports stay whole across the upgrade.
    minute = MINUTE[op.get_bind().dialect.name]
    op.execute(
        f"""
        INSERT INTO prediction_counts (minute, endpoint, model, variant, label, cached, n, score_sum)
        SELECT {minute}, endpoint, model, coalesce(variant, ''), label, cached, count(*), sum(score)
        FROM predictions
        GROUP BY {minute}, endpoint, model, coalesce(variant, ''), label, cached
        """
    )


def downgrade() -> None:
    op.drop_table("prediction_counts")
