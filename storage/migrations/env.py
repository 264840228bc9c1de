"""Alembic environment: the URL comes from storage.migrate (never from a file of its own)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, make_url, pool

from storage.db import MIGRATION_CONNECT_ARGS, anchored, ensure_sqlite_folder
from storage.tables import metadata

config = context.config
given = config.get_main_option("sqlalchemy.url")
if not given:
    raise RuntimeError("no database URL: run migrations through storage.migrate")
url = anchored(given)


def engine_backend(url: str) -> str:
    return make_url(url).get_backend_name()


def run_offline() -> None:
    context.configure(url=url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    ensure_sqlite_folder(url)
    postgres = engine_backend(url) == "postgresql"
    engine = create_engine(url, poolclass=pool.NullPool, connect_args=MIGRATION_CONNECT_ARGS if postgres else {})
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            if postgres:
                # Replicas or a Job starting together: one migrates, the others wait for the
                # lock (up to a minute), then find the schema at head and do nothing.
                connection.exec_driver_sql("SET LOCAL lock_timeout = '60s'")
                connection.exec_driver_sql("SELECT pg_advisory_xact_lock(727270001)")
                # A table lock held by a long query must fail the migration, not queue every
                # query behind its ALTER: lock waits are bounded.
                connection.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
