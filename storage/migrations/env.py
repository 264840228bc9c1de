"""Alembic environment: the URL comes from storage.migrate (never from a file of its own)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from storage.db import anchored, ensure_sqlite_folder
from storage.tables import metadata

config = context.config
given = config.get_main_option("sqlalchemy.url")
if not given:
    raise RuntimeError("no database URL: run migrations through storage.migrate")
url = anchored(given)


def run_offline() -> None:
    context.configure(url=url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    ensure_sqlite_folder(url)
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Replicas or a Job starting together: one migrates, the others wait for the
                # lock, then find the schema at head and do nothing.
                connection.exec_driver_sql("SELECT pg_advisory_xact_lock(727270001)")
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
