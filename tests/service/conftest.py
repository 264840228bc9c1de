"""The service through BentoML's ASGI app, with the embedded backends and the quick models."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from tests.support.serving import IN_PROCESS_ONLY

_clients = itertools.count(1)


@pytest.fixture(scope="package")
def service_env(model_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment read by service.config before the service module is first imported, set
    for this folder's tests only: put back as it was once they are done."""
    db = Path(tmp_path_factory.mktemp("analytics")) / "analytics.db"
    env = {
        "DATABASE_URL": f"sqlite:///{db}",
        # this session's own: the analytics logs, the embedded cache and limiter, the id key
        "SPILL_DIR": str(db.parent / "spill"),
        **model_env,
        # The test client's peer; each test then names its own client in X-Forwarded-For.
        "TRUSTED_PROXIES": "10.0.0.0/8",
        "SERVICE_WORKERS": "1",
        # small job limits, so the bad-input tests stay small
        "MAX_JOB_TEXTS": "300",
        "MAX_JOB_BODY_BYTES": "65536",
        # room for the rate limit test's ten jobs from one client (the quota test fills it itself)
        "MAX_ACTIVE_JOBS_PER_CLIENT": "12",
    }
    # A test module imported earlier (service.jobs, through service.schemas) may have read the
    # settings already, before this environment: the service must read them again, and so must
    # whatever runs after these tests.
    from service.config import get_settings

    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        IN_PROCESS_ONLY.update(env)  # not for the instances other tests serve
        get_settings.cache_clear()
        from storage import migrate

        migrate.upgrade(env["DATABASE_URL"])  # what the on_deployment hook does under bentoml serve
        try:
            yield env
        finally:
            IN_PROCESS_ONLY.difference_update(env)
    get_settings.cache_clear()


@pytest.fixture(scope="package")
def client(service_env: dict[str, str]) -> Iterator[TestClient]:
    from service.service import Sentiment

    with TestClient(Sentiment.to_asgi(), client=("10.0.0.9", 5555), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def ip() -> str:
    """A client address of this test's own, so rate limits never leak between tests."""
    n = next(_clients)
    return f"192.0.2.{n}" if n < 255 else f"198.51.100.{n - 254}"


@pytest.fixture
def headers(ip: str) -> dict[str, str]:
    return {"X-Forwarded-For": ip}
