"""jobs: a hash of each job's bearer token, the time a chunk of it was last claimed, and an
index for the per-client quotas

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 03:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable columns and a new index only: replicas of the previous version keep working on
    # the migrated schema (their inserts leave both columns NULL).
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("token_sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_jobs_client_status", "jobs", ["client", "status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_client_status", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("claimed_at")
        batch.drop_column("token_sha256")
