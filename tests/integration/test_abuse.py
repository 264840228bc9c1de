"""Hostile clients against a real `bentoml serve` on Redis and PostgreSQL, over real sockets:
a trickled upload, readers that stop reading, and a job whose chunk always fails (a test model
that raises) ending with an alert in a real Prometheus. `make abuse` measures the same cases
under load, with memory and the latency of interactive traffic beside them."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtests.harness import metric_totals
from tests.support.jobs import done_job
from tests.support.prometheus import Prometheus
from tests.support.servers import PostgresServer, RedisServer, scratch_database
from tests.support.serving import ROOT, Served, free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MARKER = "raise-in-the-test-model"
SEND_TIMEOUT_S = 2
UPLOAD_TIMEOUT_S = 2
JOB_SLOTS = 3  # /jobs requests the (one) worker serves at once


@pytest.fixture(scope="module")
def database(postgres_server: PostgresServer) -> Iterator[str]:
    with scratch_database(postgres_server.url, "abuse") as url:
        yield url


@pytest.fixture(scope="module")
def hostile(
    model_env: dict[str, str],
    bentoml_home: Path,
    redis_server: RedisServer,
    database: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Served, Prometheus]]:
    """One worker with short timeouts and few job slots, a model that raises on MARKER, and a
    Prometheus scraping it every second with the committed alert rules."""
    workdir = tmp_path_factory.mktemp("abuse")
    env = {
        "BENTOML_HOME": str(bentoml_home),
        **model_env,
        "REDIS_URL": redis_server.url,
        "DATABASE_URL": database,
        "SPILL_DIR": str(workdir / "spill"),
        "TRUSTED_PROXIES": "127.0.0.1",
        "JOB_SEND_TIMEOUT_SECONDS": str(SEND_TIMEOUT_S),
        "JOB_UPLOAD_TIMEOUT_SECONDS": str(UPLOAD_TIMEOUT_S),
        "MAX_JOB_REQUESTS_IN_FLIGHT": str(JOB_SLOTS),
        "JOB_MAX_ATTEMPTS": "2",
        "PYTHONPATH": str(ROOT / "tests" / "support" / "failing_model"),
        "FAILING_MARKER": MARKER,
    }
    with (
        Served(env, workdir / "serve.log", workers=1) as served,
        Prometheus([f"127.0.0.1:{served.port}"], workdir / "prometheus", free_port()) as prometheus,
    ):
        yield served, prometheus


def _raw(port: int, request: bytes, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    return sock


def _answer(sock: socket.socket, timeout: float) -> tuple[int, bytes]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def _length(data: bytes) -> int:
    found = re.search(rb"content-length: (\d+)", data, re.I)
    return int(found.group(1)) if found else 0


def test_a_trickled_upload_is_refused_with_408(hostile: tuple[Served, Prometheus]) -> None:
    served, _ = hostile
    head = (
        b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Forwarded-For: 198.18.1.1\r\nContent-Length: 100000\r\n\r\n"
    )
    sock = _raw(served.port, head + b'{"texts": ["')
    started = time.monotonic()
    try:
        sock.setblocking(False)
        status = 0
        while time.monotonic() - started < UPLOAD_TIMEOUT_S + 10:
            try:
                sock.send(b"a")  # a byte every 100 ms: 100 kB would take hours
            except OSError:
                break
            time.sleep(0.1)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            status = int(data.split(b" ", 2)[1])
            break
        took = time.monotonic() - started
    finally:
        sock.close()
    assert status == 408, data
    assert UPLOAD_TIMEOUT_S <= took < UPLOAD_TIMEOUT_S + 5
    assert b"JOB_UPLOAD_TIMEOUT_SECONDS" in data and b'"request_id"' in data


def _cut(url: str) -> float:
    return metric_totals(url, ("sentiment_job_readers_cut_total",))["sentiment_job_readers_cut_total"]


def test_readers_that_stop_reading_are_cut_off_and_free_their_slots(
    hostile: tuple[Served, Prometheus], database: str
) -> None:
    served, _ = hostile
    # about 8 MB of results: more than the kernel's socket buffers hold for a reader that stops
    job_id, token = done_job(database, 60_000)
    cut_before = _cut(served.url)
    readers = [
        _raw(
            served.port,
            f"GET /jobs/{job_id}/results HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"X-Forwarded-For: 198.18.3.{n}\r\n\r\n".encode(),
            rcvbuf=4096,
        )
        for n in range(JOB_SLOTS)
    ]
    try:
        time.sleep(0.5)
        auth = {"Authorization": f"Bearer {token}", "X-Forwarded-For": "198.18.4.1"}
        full = httpx.get(f"{served.url}/jobs/{job_id}", headers=auth, timeout=30)
        assert full.status_code == 503 and "Retry-After" in full.headers  # every job slot held
        # the prediction endpoints have slots of their own
        assert httpx.post(f"{served.url}/predict", json={"text": "Still answering."}, timeout=30).status_code == 200
        deadline = time.monotonic() + SEND_TIMEOUT_S + 10
        while _cut(served.url) - cut_before < JOB_SLOTS:
            assert time.monotonic() < deadline, "the stalled readers were not cut off"
            time.sleep(0.2)
        assert httpx.get(f"{served.url}/jobs/{job_id}", headers=auth, timeout=30).status_code == 200
    finally:
        for sock in readers:
            sock.close()
    # a reader that reads gets every line
    lines = httpx.get(f"{served.url}/jobs/{job_id}/results", headers=auth, timeout=60).text.splitlines()
    assert len(lines) == 60_000


def test_a_chunk_that_always_fails_ends_its_job_and_fires_the_alert(hostile: tuple[Served, Prometheus]) -> None:
    served, prometheus = hostile
    texts = ["A fine text before it", f"This one breaks the model: {MARKER}", "A fine text after it"]
    r = httpx.post(f"{served.url}/jobs", json={"texts": texts}, headers={"X-Forwarded-For": "198.18.5.1"}, timeout=60)
    assert r.status_code == 202, r.text
    job = r.json()
    auth = {"Authorization": f"Bearer {job['token']}", "X-Forwarded-For": "198.18.5.1"}
    deadline = time.monotonic() + 120
    while (status := httpx.get(f"{served.url}/jobs/{job['job_id']}", headers=auth, timeout=30).json())["status"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status["status"] == "failed" and "failed 2 times" in status["error"], status
    assert "the test model raises" in status["error"]
    deadline = time.monotonic() + 60
    while not (firing := prometheus.query('ALERTS{alertname="SentimentJobFailed",alertstate="firing"}')):
        assert time.monotonic() < deadline, "SentimentJobFailed never fired"
        time.sleep(1)
    assert firing[0]["metric"]["severity"] == "warning"
    time.sleep(3)  # no endless retry: the two attempts are all the log has
    attempts = re.findall(rf"job {job['job_id']} (?:chunk 0 failed|failed: chunk 0)", served.tail(200_000))
    assert len(attempts) == 2, attempts
    assert job["token"] not in served.tail(200_000)  # logs never print a token
