"""Real Redis and PostgreSQL for the integration tests.

`redis_url` / `database_url`: TEST_REDIS_URL / TEST_DATABASE_URL when set, otherwise throwaway
servers this session starts. Fault tests use `redis_server` / `postgres_server` directly, which
are always their own servers, so stopping them never touches anybody else's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.servers import PostgresServer, RedisServer, scratch_database


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    if os.environ.get("TEST_REDIS_URL"):
        return os.environ["TEST_REDIS_URL"]
    return request.getfixturevalue("redis_server").url


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A database of this test's own on the shared server, migrated to the newest schema."""
    from storage import migrate

    base = os.environ.get("TEST_DATABASE_URL") or request.getfixturevalue("postgres_server").url
    with scratch_database(base, "t_") as url:
        migrate.upgrade(url)
        yield url
