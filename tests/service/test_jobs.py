"""Bulk jobs through the ASGI app: submit, progress, results in order, cancel, bad input."""

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


def _wait_done(client: TestClient, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        progress = client.get(f"/jobs/{job_id}").json()
        if progress["status"] in ("done", "failed", "cancelled") or time.monotonic() > deadline:
            return dict(progress)
        time.sleep(0.2)


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
    progress = _wait_done(client, body["job_id"])
    assert progress["status"] == "done" and progress["done"] == 70 and progress["finished_at"], progress
    results = client.get(f"/jobs/{body['job_id']}/results")
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
    assert _wait_done(client, r.json()["job_id"])["status"] == "done"


def test_a_cancelled_job_stops_and_its_results_are_refused(client: TestClient, headers: dict[str, str]) -> None:
    job = client.post("/jobs", json={"texts": [f"text {i} {uuid.uuid4()}" for i in range(200)]}, headers=headers).json()
    cancelled = client.delete(f"/jobs/{job['job_id']}")
    assert cancelled.status_code == 200 and cancelled.json() == {"job_id": job["job_id"], "status": "cancelled"}
    progress = client.get(f"/jobs/{job['job_id']}").json()
    assert progress["status"] == "cancelled" and progress["done"] < 200
    results = client.get(f"/jobs/{job['job_id']}/results")
    assert results.status_code == 409 and results.json()["progress"]["status"] == "cancelled"
    assert client.delete(f"/jobs/{job['job_id']}").status_code == 409  # already finished


def test_job_bad_input_gets_clear_4xx(client: TestClient, headers: dict[str, str]) -> None:
    unknown = str(uuid.uuid4())
    for method, path in (
        ("get", f"/jobs/{unknown}"),
        ("get", f"/jobs/{unknown}/results"),
        ("delete", f"/jobs/{unknown}"),
    ):
        r = getattr(client, method)(path)
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
    ids = [
        client.post(
            "/jobs", json={"texts": [f"job {j} text {i} {uuid.uuid4()}" for i in range(40)]}, headers=headers
        ).json()["job_id"]
        for j in range(2)
    ]
    for job_id in ids:
        progress = _wait_done(client, job_id)
        assert progress["status"] == "done" and progress["done"] == 40
        assert len(client.get(f"/jobs/{job_id}/results").text.splitlines()) == 40


def test_job_submissions_are_rate_limited_per_client(client: TestClient, ip: str) -> None:
    statuses = [
        client.post("/jobs", json={"texts": ["a fine text"]}, headers={"X-Forwarded-For": ip}).status_code
        for _ in range(11)
    ]
    assert statuses == [202] * 10 + [429]
