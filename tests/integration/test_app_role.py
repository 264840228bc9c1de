"""deploy/postgres/app-role.sh on a real PostgreSQL: the replicas' role reads and writes the rows
of every table the migrations create, before or after it, and changes no schema."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from storage import migrate
from storage.analytics import PredictionRecord, SqlAnalyticsStore
from tests.support.servers import PostgresServer
from tests.support.serving import ROOT

pytestmark = pytest.mark.integration

SCRIPT = ROOT / "deploy" / "postgres" / "app-role.sh"


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    """A cluster of this module's own: roles are cluster-wide."""
    with PostgresServer() as pg:
        yield pg


def _url(server: PostgresServer, user: str) -> str:
    return f"postgresql+psycopg://{user}@127.0.0.1:{server.port}/sentiment"


def _app_role(server: PostgresServer) -> subprocess.CompletedProcess[str]:
    """The script as the postgres image runs it: the owner's name, the database, the password."""
    env = {
        **os.environ,
        "PATH": f"{server.bin}:{os.environ['PATH']}",
        "PGHOST": "127.0.0.1",
        "PGPORT": str(server.port),
        "POSTGRES_USER": "sentiment",
        "POSTGRES_DB": "sentiment",
        "POSTGRES_APP_PASSWORD": "it's a password",
    }
    return subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def _record() -> PredictionRecord:
    return PredictionRecord(
        request_id=str(uuid.uuid4()),
        endpoint="/predict",
        model="m:1",
        label="positive",
        score=0.9,
        cached=False,
        latency_ms=5.0,
        text_sha256="0" * 64,
        text_length=5,
    )


def _privileges(engine: sa.Engine) -> dict[str, set[str]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT table_name, privilege_type FROM information_schema.role_table_grants"
            " WHERE grantee = 'sentiment_app' AND table_schema = 'public'"
        ).all()
    found: dict[str, set[str]] = {}
    for table, privilege in rows:
        found.setdefault(table, set()).add(privilege)
    return found


def test_app_role_reads_and_writes_rows_and_changes_no_schema(server: PostgresServer, tmp_path: Path) -> None:
    bootstrap = sa.create_engine(server.url, isolation_level="AUTOCOMMIT")
    with bootstrap.connect() as conn:  # what the postgres image makes of POSTGRES_USER and POSTGRES_DB
        conn.exec_driver_sql("CREATE ROLE sentiment LOGIN SUPERUSER")
        conn.exec_driver_sql("CREATE DATABASE sentiment OWNER sentiment")
    bootstrap.dispose()
    first = _app_role(server)
    assert first.returncode == 0, first.stderr
    migrate.upgrade(_url(server, "sentiment"))  # the migrate service, as the owner
    owner = sa.create_engine(_url(server, "sentiment"))
    app = sa.create_engine(_url(server, "sentiment_app"))
    try:
        crud = {"SELECT", "INSERT", "UPDATE", "DELETE"}
        tables = _privileges(owner)
        assert {"predictions", "prediction_counts", "feedback", "request_errors", "alembic_version"} <= set(tables)
        assert all(granted == crud for granted in tables.values()), tables
        migrate.upgrade(_url(server, "sentiment_app"))  # each replica's start-up upgrade: at head, a read
        with owner.begin() as conn:  # a table a later migration adds, with a sequence
            conn.exec_driver_sql("CREATE TABLE later (id serial PRIMARY KEY, note text)")
        with app.begin() as conn:
            new_id = conn.exec_driver_sql("INSERT INTO later (note) VALUES ('x') RETURNING id").scalar_one()
            conn.exec_driver_sql("UPDATE later SET note = 'y' WHERE id = %s", (new_id,))
            kept = conn.exec_driver_sql("SELECT note FROM later").scalar_one()
            conn.exec_driver_sql("DELETE FROM later")
            superuser = conn.exec_driver_sql("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").scalar_one()
        assert kept == "y" and superuser is False
        store = SqlAnalyticsStore(_url(server, "sentiment_app"), spill_dir=tmp_path / "spill")  # as a replica
        store.record([_record() for _ in range(20)])
        assert store.flush() == 20 and store.healthy
        with app.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM predictions").scalar_one() == 20
            assert conn.exec_driver_sql("SELECT sum(n) FROM prediction_counts WHERE period_s = 60").scalar_one() == 20
        store.close()
        for ddl in (
            "CREATE TABLE intruder (id int)",
            "CREATE TEMP TABLE scratch (id int)",
            "ALTER TABLE predictions ADD COLUMN extra int",
            "DROP TABLE later",
            "TRUNCATE predictions",
        ):
            with pytest.raises(sa.exc.ProgrammingError, match="permission denied|must be owner"), app.begin() as conn:
                conn.exec_driver_sql(ddl)
        again = _app_role(server)  # an existing database: the script can be run again
        assert again.returncode == 0, again.stderr
    finally:
        owner.dispose()
        app.dispose()
