"""Bulk jobs through the ASGI app: submit, progress, results in order, cancel, bad input,
bodies refused as they arrive, tokens, quotas and read limits."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from starlette.testclient import TestClient

# Through the service's ASGI app, so with the quick models loaded: slow, as the other app tests.
# (Left in the fast subset, it ran after test_job_runner.py, whose import of service.jobs reads
# the settings before tests/service/conftest.py sets the environment they come from.)
pytestmark = pytest.mark.slow


def _auth(job: dict) -> dict[str, str]:
    return {"Authorization": f"Bearer {job['token']}", "X-Forwarded-For": f"198.18.0.{hash(job['job_id']) % 250}"}


def _wait_done(client: TestClient, job: dict, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    job_id = job["job_id"]
    while True:
        progress = client.get(f"/jobs/{job_id}", headers=_auth(job)).json()
        if progress["status"] in ("done", "failed", "cancelled") or time.monotonic() > deadline:
            return dict(progress)
        time.sleep(0.5)


def test_a_job_is_scored_with_one_result_per_text_in_order(client: TestClient, headers: dict[str, str]) -> None:
    texts = [
        f"{'A wonderful, delightful' if i % 2 else 'A dreadful, awful'} film number {i} {uuid.uuid4()}"
        for i in range(70)
    ]
    texts[5] = texts[3]  # a repeat: scored once, the second from the cache
    r = client.post("/jobs", json={"texts": texts}, headers=headers)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "queued" and body["total"] == 70 and r.headers["location"] == f"/jobs/{body['job_id']}"
    progress = _wait_done(client, body)
    assert progress["status"] == "done" and progress["done"] == 70 and progress["finished_at"], progress
    results = client.get(f"/jobs/{body['job_id']}/results", headers=_auth(body))
    assert results.status_code == 200 and results.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in results.text.splitlines()]
    assert [line["index"] for line in lines] == list(range(70))
    assert {line["label"] for line in lines[1::2]} == {"positive"} and {line["label"] for line in lines[0::2]} == {
        "negative"
    }
    assert set(lines[0]) == {"index", "label", "score", "probabilities"}
    deadline = time.monotonic() + 30  # each scored text is an analytics row under /jobs
    while (jobs := client.get("/analytics/summary").json()["by_endpoint"].get("/jobs", 0)) < 70:
        assert time.monotonic() < deadline, jobs
        time.sleep(0.5)


def test_ndjson_bodies_are_taken_too(client: TestClient, headers: dict[str, str]) -> None:
    body = "\n".join(json.dumps({"text": f"line {i} was great {uuid.uuid4()}"}) for i in range(3)) + "\n"
    r = client.post("/jobs", content=body, headers={**headers, "content-type": "application/x-ndjson"})
    assert r.status_code == 202 and r.json()["total"] == 3
    assert _wait_done(client, r.json())["status"] == "done"


def test_a_cancelled_job_stops_and_its_results_are_refused(client: TestClient, headers: dict[str, str]) -> None:
    job = client.post("/jobs", json={"texts": [f"text {i} {uuid.uuid4()}" for i in range(200)]}, headers=headers).json()
    cancelled = client.delete(f"/jobs/{job['job_id']}", headers=_auth(job))
    assert cancelled.status_code == 200 and cancelled.json() == {"job_id": job["job_id"], "status": "cancelled"}
    progress = client.get(f"/jobs/{job['job_id']}", headers=_auth(job)).json()
    assert progress["status"] == "cancelled" and progress["done"] < 200
    results = client.get(f"/jobs/{job['job_id']}/results", headers=_auth(job))
    assert results.status_code == 409 and results.json()["progress"]["status"] == "cancelled"
    assert client.delete(f"/jobs/{job['job_id']}", headers=_auth(job)).status_code == 409  # already finished


def test_job_bad_input_gets_clear_4xx(client: TestClient, headers: dict[str, str]) -> None:
    unknown = str(uuid.uuid4())
    for method, path in (
        ("get", f"/jobs/{unknown}"),
        ("get", f"/jobs/{unknown}/results"),
        ("delete", f"/jobs/{unknown}"),
    ):
        r = getattr(client, method)(path, headers=headers)
        assert r.status_code == 404 and unknown in r.json()["error"], (method, path, r.text)
    cases = [
        ({"texts": [f"t{i}" for i in range(301)]}, "MAX_JOB_TEXTS"),
        ({"texts": []}, "texts"),
        ({"texts": ["fine", "   "]}, "item 1"),
        ({"text": "one"}, "texts"),
    ]
    for body, named in cases:
        r = client.post("/jobs", json=body, headers=headers)
        assert r.status_code == 400 and named in r.json()["error"], (body, r.text)
    r = client.post("/jobs", content="{not json", headers={**headers, "content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = client.post(
        "/jobs", content='{"text": "ok"}\n{"nope": 1}\n', headers={**headers, "content-type": "application/x-ndjson"}
    )
    assert r.status_code == 400 and "line 2" in r.json()["error"]
    big = {"texts": ["x" * 4000] * 20}  # 80 kB: over MAX_JOB_BODY_BYTES here, under MAX_BODY_BYTES' 1 MiB
    r = client.post("/jobs", json=big, headers=headers)
    assert r.status_code == 413 and "MAX_JOB_BODY_BYTES" in r.json()["error"]


def test_two_concurrent_jobs_both_finish(client: TestClient, headers: dict[str, str]) -> None:
    jobs = [
        client.post(
            "/jobs", json={"texts": [f"job {j} text {i} {uuid.uuid4()}" for i in range(40)]}, headers=headers
        ).json()
        for j in range(2)
    ]
    for job in jobs:
        progress = _wait_done(client, job)
        assert progress["status"] == "done" and progress["done"] == 40
        assert len(client.get(f"/jobs/{job['job_id']}/results", headers=_auth(job)).text.splitlines()) == 40


def test_job_submissions_are_rate_limited_per_client(client: TestClient, ip: str) -> None:
    statuses = [
        client.post("/jobs", json={"texts": ["a fine text"]}, headers={"X-Forwarded-For": ip}).status_code
        for _ in range(11)
    ]
    assert statuses == [202] * 10 + [429]


def test_a_job_is_reachable_only_with_its_token(client: TestClient, headers: dict[str, str]) -> None:
    mine = client.post("/jobs", json={"texts": ["a fine day out"]}, headers=headers).json()
    other = client.post("/jobs", json={"texts": ["another fine day"]}, headers=headers).json()
    assert len(mine["token"]) >= 43 and mine["token"] != other["token"]  # 256 random bits, url-safe base64
    job_id = mine["job_id"]
    wrong = [
        {},  # no token
        {"Authorization": f"Bearer {other['token']}"},  # another job's
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {mine['token']}"},
    ]
    for auth in wrong:
        for method, path in (
            ("get", f"/jobs/{job_id}"),
            ("get", f"/jobs/{job_id}/results"),
            ("delete", f"/jobs/{job_id}"),
        ):
            r = getattr(client, method)(path, headers={**headers, **auth})
            # the same answer as for a job that does not exist: its existence does not leak
            assert r.status_code == 404 and r.json()["error"] == f"unknown job {job_id}", (auth, method, r.text)
    assert _wait_done(client, mine)["status"] == "done"
    assert client.get(f"/jobs/{job_id}/results", headers=_auth(mine)).status_code == 200


def test_pathological_bodies_are_refused_as_they_arrive(client: TestClient, headers: dict[str, str]) -> None:
    ndjson = {**headers, "content-type": "application/x-ndjson"}
    cases = [
        # too many tiny items: refused at the 301st, before the rest of the body is parsed
        (json.dumps({"texts": ["a"] * 10_000}), headers, 400, "MAX_JOB_TEXTS"),
        ("\n".join(['{"text":"a"}'] * 4000), ndjson, 400, "MAX_JOB_TEXTS"),
        ('{"texts": ' + "[" * 30_000 + "]" * 30_000 + "}", headers, 400, "item 0: must be a string"),
        ("[" * 60_000, headers, 400, 'expected {"texts": [str, ...]}'),
        ('{"texts": ["a"], "texts": ["b"]}', headers, 400, 'expected {"texts": [str, ...]}'),
        ('{"texts": ["a"]} trailing', headers, 400, "not valid JSON"),
        ("[" * 40_000 + "\n", ndjson, 400, 'line 1: expected {"text": str}'),
        ('{"text": "' + "x" * 62_000 + '"}\n', ndjson, 400, "line 1: must be at most 5000 characters"),
        ('{"texts": ["' + "x" * 6000 + '"]}', headers, 400, "item 0: must be at most 5000 characters"),
        ("\n" * 100, ndjson, 400, "got 0"),
    ]
    for n, (body, sent_headers, status, named) in enumerate(cases):
        # a client of its own for each body, past the submissions' rate limit
        r = client.post(
            "/jobs", content=body, headers={**sent_headers, "X-Forwarded-For": f"198.19.{n}.{len(body) % 250}"}
        )
        assert r.status_code == status and named in r.json()["error"], (body[:40], r.text)
        assert r.json()["request_id"]


def test_a_chunked_body_is_counted_as_it_arrives(client: TestClient, headers: dict[str, str]) -> None:
    sent = []

    def trickle():  # no Content-Length: the service counts the bytes itself
        for _ in range(100):
            sent.append(1)
            yield b'{"text": "' + b"y" * 1000 + b'"}\n'

    r = client.post("/jobs", content=trickle(), headers={**headers, "content-type": "application/x-ndjson"})
    assert r.status_code == 413 and "MAX_JOB_BODY_BYTES" in r.json()["error"] and r.json()["request_id"]


def _fake_job(client: TestClient, owner: str, total: int) -> str:
    """A queued job of `owner` with `total` texts and no chunks (none to score: it stays queued)."""
    import sqlalchemy as sa

    from service.config import get_settings
    from storage.analytics.records import utcnow
    from storage.tables import jobs

    job_id = str(uuid.uuid4())
    model = client.get("/health").json()["model"]["A"]
    with sa.create_engine(get_settings().database_url).begin() as conn:
        conn.execute(
            jobs.insert().values(
                job_id=job_id, status="queued", total=total, done=0, model=model, client=owner, created_at=utcnow()
            )
        )
    return job_id


def _drop_jobs(ids: list[str]) -> None:
    import sqlalchemy as sa

    from service.config import get_settings
    from storage.tables import jobs

    with sa.create_engine(get_settings().database_url).begin() as conn:
        conn.execute(jobs.delete().where(jobs.c.job_id.in_(ids)))


def test_job_quotas_refuse_per_client_with_429_and_for_everyone_with_503(
    client: TestClient, ip: str, headers: dict[str, str]
) -> None:
    from service.config import get_settings

    settings = get_settings()
    fakes = [_fake_job(client, ip, 1) for _ in range(settings.max_active_jobs_per_client)]
    try:
        r = client.post("/jobs", json={"texts": ["one more"]}, headers=headers)
        assert r.status_code == 429 and "MAX_ACTIVE_JOBS_PER_CLIENT" in r.json()["error"], r.text
        assert int(r.headers["retry-after"]) > 0 and r.json()["request_id"]
    finally:
        _drop_jobs(fakes)
    fakes = [_fake_job(client, ip, settings.max_queued_texts_per_client)]
    try:
        r = client.post("/jobs", json={"texts": ["one more"]}, headers=headers)
        assert r.status_code == 429 and "MAX_QUEUED_TEXTS_PER_CLIENT" in r.json()["error"], r.text
    finally:
        _drop_jobs(fakes)
    fakes = [_fake_job(client, "203.0.113.250", settings.max_queued_texts)]  # another client's backlog
    try:
        r = client.post("/jobs", json={"texts": ["one more"]}, headers=headers)
        assert r.status_code == 503 and "MAX_QUEUED_TEXTS" in r.json()["error"], r.text
        assert int(r.headers["retry-after"]) > 0
    finally:
        _drop_jobs(fakes)
    assert client.post("/jobs", json={"texts": ["one more"]}, headers=headers).status_code == 202


def test_job_reads_are_rate_limited_per_client(client: TestClient, headers: dict[str, str]) -> None:
    from service.config import get_settings

    job = client.post("/jobs", json={"texts": ["a calm read"]}, headers=headers).json()
    auth = {**headers, "Authorization": f"Bearer {job['token']}"}
    limit = int(get_settings().rate_limit_job_reads.split("/")[0])
    statuses = [client.get(f"/jobs/{job['job_id']}", headers=auth).status_code for _ in range(limit + 1)]
    assert statuses[:limit] == [200] * limit and statuses[limit] == 429
    r = client.delete(f"/jobs/{job['job_id']}", headers=auth)  # cancel counts too
    assert r.status_code == 429 and "rate limit" in r.json()["error"]
