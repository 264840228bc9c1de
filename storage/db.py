"""Engines for the analytics database, and the one rule for where a SQLite file lives."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Self
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

# The project's folder (beside storage/): relative SQLite paths are anchored here.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_URL = "sqlite:///var/analytics.db"
# Address space, not memory: pages are the OS page cache's, shared and reclaimable.
SQLITE_MMAP_BYTES = 1 << 30
# Where Docker, compose and Kubernetes mount secrets as files (SECRETS_DIR overrides it).
SECRETS_DIR = "/run/secrets"


def secrets_dir() -> Path | None:
    """The folder of secret files, if there is one: $SECRETS_DIR, else /run/secrets."""
    path = Path(os.environ.get("SECRETS_DIR") or SECRETS_DIR)
    return path if path.is_dir() else None


def with_password(url: str, password: str | None) -> str:
    """`url` (redis://, postgresql+psycopg://) with `password` as its password, when one is
    given: the password comes from a secret file, the rest of the URL from the environment."""
    parts = urlsplit(url)
    if not password or not parts.hostname:  # SQLite, a Unix socket: no password to set
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]  # as written: already percent-encoded
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for other databases and in-memory SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        return Path(parsed.database)
    return None


def anchored(url: str) -> str:
    """`url` with a relative SQLite path made the project's (var/analytics.db beside storage/),
    whatever the working directory: BentoML's parent process, which migrates, and its workers
    may start in different ones (seen in the container image). Other URLs are returned as given."""
    path = _sqlite_file(url)
    if path is None or path.is_absolute():
        return url
    return make_url(url).set(database=str(PROJECT_ROOT / path)).render_as_string(hide_password=False)


def ensure_sqlite_folder(url: str) -> None:
    """Create the folder of a SQLite file (e.g. var/ on a first start)."""
    path = _sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def make_engine(url: str, pool_size: int = 5, max_overflow: int = 5) -> Engine:
    """An engine for `url`; SQLite gets WAL and a busy timeout so several workers can share it.
    `pool_size` and `max_overflow`: PostgreSQL connections it holds and may open beyond them."""
    url = anchored(url)
    if make_url(url).get_backend_name() == "sqlite":
        ensure_sqlite_folder(url)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - exercised via queries
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            # Reads through the OS page cache without a copy per page: the reports' sampled
            # percentiles look rows up by rowid all over a large file (3x faster at 1M rows).
            cur.execute(f"PRAGMA mmap_size={SQLITE_MMAP_BYTES}")
            cur.close()

        return engine
    # Short timeouts: a database outage must turn into buffering quickly, not hung requests.
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=2,
        connect_args={
            "connect_timeout": 3,
            # A query on a connection that died silently must fail, not hang the writer or a
            # shutdown: a statement timeout plus TCP keepalives bound both.
            "options": "-c statement_timeout=15000",
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            # Sent data unacknowledged this long (ms): a blackholed connection fails in 10 s,
            # where the kernel's retransmissions alone would hold it for about 15 minutes.
            "tcp_user_timeout": 10_000,
        },
    )


# For migrations (storage/migrations/env.py): the same bounds on a dead network.
MIGRATION_CONNECT_ARGS = {"connect_timeout": 10, "tcp_user_timeout": 10_000, "keepalives": 1, "keepalives_idle": 5}


class DatabaseSettings(BaseSettings):
    """The database's settings, from the environment or from files named after them in
    secrets_dir() (a variable set in both wins): the service's Settings extend them, and the
    migrations' command reads them alone. Load with `load()`, which finds that folder."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    database_url: str = DEFAULT_URL
    # Given, it replaces the password of DATABASE_URL, which then needs none.
    database_password: SecretStr | None = None

    @classmethod
    def load(cls) -> Self:
        return cls(_secrets_dir=secrets_dir())  # type: ignore[call-arg]

    @field_validator("database_url")
    @classmethod
    def _anchor_sqlite_path(cls, value: str) -> str:
        return anchored(value)

    @model_validator(mode="after")
    def _password_into_url(self) -> Self:
        if self.database_password:
            self.database_url = with_password(self.database_url, self.database_password.get_secret_value())
        return self
