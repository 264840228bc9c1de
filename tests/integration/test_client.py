"""The client package (client/: the Python API and `sentiment-client`) against a real
`bentoml serve` on the quick models, started as tests/integration/test_serve.py starts it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.serving import ROOT, Served, embedded_env, free_port

# The client is a package of its own (client/pyproject.toml), not installed into the project's venv.
sys.path.insert(0, str(ROOT / "client"))
from sentiment_client import JobStatus, SentimentClient, SentimentError  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SUBJECTS = ["The battery", "Customer support", "The delivery", "This blender", "The hotel room", "The plot"]
VERDICTS = ["was wonderful", "broke after two days", "exceeded my hopes", "was a waste of money", "is fine"]


ADMIN_KEY = "client-tests-" + "0123456789abcdef" * 2


@dataclass
class Service:
    url: str
    database: Path

    def job_ids(self) -> set[str]:
        """Every job the service has stored, read from its analytics database."""
        with contextlib.closing(sqlite3.connect(self.database, timeout=30)) as db:
            return {row[0] for row in db.execute("SELECT job_id FROM jobs")}


@pytest.fixture(scope="module")
def service(
    model_env: dict[str, str], bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("serve")
    # a jobs window short enough for a test to watch the client wait out a 429 and get through
    env = embedded_env(
        bentoml_home,
        model_env,
        workdir,
        TRUSTED_PROXIES="127.0.0.1",
        RATE_LIMIT_JOBS="3/10 seconds",
        ADMIN_API_KEY=ADMIN_KEY,
    )
    with Served(env, workdir / "serve.log", workers=2) as server:
        yield Service(server.url, workdir / "analytics.db")


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sentiment-client` installed from a copy of client/ as pip installs it, into a folder of
    its own (its dependencies, httpx and tqdm, come from the venv): the folder to put on PYTHONPATH."""
    work = tmp_path_factory.mktemp("client")
    source = work / "src"
    shutil.copytree(ROOT / "client", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(work / "lib"), str(source)], check=True)
    assert (work / "lib" / "bin" / "sentiment-client").exists()
    return work / "lib"


def command(lib: Path, *args: str) -> list[str]:
    return [str(lib / "bin" / "sentiment-client"), *args]


def run(lib: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(lib)}
    return subprocess.run(command(lib, *args), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def reviews(n: int) -> list[str]:
    """`n` different texts no earlier test has sent (so none is a cache hit)."""
    tag = uuid.uuid4().hex[:8]
    return [f"{SUBJECTS[i % 6]} {VERDICTS[i % 5]}, order {tag}-{i}." for i in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_and_batch(service: Service, model_env: dict[str, str]) -> None:
    texts = reviews(150)
    with SentimentClient(service.url) as client:
        one = client.predict(texts[0])
        assert one.model == model_env["SENTIMENT_MODEL"] and not one.cached
        assert one.label in ("positive", "negative") and one.score == one.probabilities[one.label]
        batch = client.batch(texts)  # 64 + 64 + 22 texts
        assert len(batch) == len(texts) and batch[0].cached
        assert len({round(p.probabilities["positive"], 4) for p in batch}) > 100, "texts too alike to check order"
        # each text's prediction, a cache hit now, is the one at its place in the batch, across the calls
        for i in (1, 63, 64, 127, 128, 149):
            again = client.predict(texts[i])
            assert again.cached and again.probabilities == pytest.approx(batch[i].probabilities, abs=1e-6), i


def test_job_submit_wait_results(service: Service) -> None:
    texts = reviews(300)
    with SentimentClient(service.url) as client:
        expected = client.batch(texts)
        before = service.job_ids()
        job = client.submit(texts)
        assert job.status == "queued" and job.total == 300
        assert service.job_ids() - before == {job.job_id}
        seen: list[JobStatus] = []
        final = client.wait(job.job_id, progress=seen.append, poll=0.2)
        assert final.status == "done" and final.done == 300 and final.finished_at is not None
        assert seen and [s.done for s in seen] == sorted(s.done for s in seen)
        results = list(client.results(job.job_id))
    assert [r.index for r in results] == list(range(300))
    for result, prediction in zip(results, expected, strict=True):
        assert result.label == prediction.label
        assert result.probabilities == pytest.approx(prediction.probabilities, abs=1e-4)


def test_job_cancel_and_errors(service: Service) -> None:
    with SentimentClient(service.url) as client:
        job = client.submit(reviews(2000))  # streamed as NDJSON
        assert job.total == 2000
        with pytest.raises(SentimentError) as not_done:
            client.results(job.job_id)
        assert not_done.value.status == 409 and not_done.value.body["progress"]["total"] == 2000
        assert client.cancel(job.job_id) == "cancelled"
        assert client.status(job.job_id).status == "cancelled"
        with pytest.raises(SentimentError) as twice:
            client.cancel(job.job_id)
        assert twice.value.status == 409 and "cancelled" in twice.value.message
        with pytest.raises(SentimentError) as unknown:
            client.status(str(uuid.uuid4()))
        assert unknown.value.status == 404 and "unknown job" in unknown.value.message
        with pytest.raises(SentimentError) as blank:
            client.predict("   ")
        assert blank.value.status == 400 and "blank" in blank.value.message and blank.value.request_id


def test_submit_waits_out_the_rate_limit(service: Service) -> None:
    """3 submissions in 10 s per client: a client that does not retry gets the 429 (nothing
    stored); one that does waits the Retry-After out and its job is stored once."""
    headers = {"X-Forwarded-For": f"203.0.113.{uuid.uuid4().int % 200 + 20}"}
    before = service.job_ids()
    accepted: set[str] = set()
    refused: SentimentError | None = None
    with SentimentClient(service.url, headers=headers, retries=0) as impatient:
        for i in range(10):
            try:
                accepted.add(impatient.submit([f"rate limited job {i}"]).job_id)
            except SentimentError as exc:
                refused = exc
                break
    assert refused is not None, "ten submissions and no 429"
    assert refused.status == 429 and refused.retry_after is not None and refused.retry_after > 0
    assert service.job_ids() - before == accepted
    with SentimentClient(service.url, headers=headers) as polite:
        job = polite.submit(["submitted after the wait"])
    assert service.job_ids() - before == accepted | {job.job_id}


def test_cli_scores_a_file(service: Service, cli: Path, tmp_path: Path) -> None:
    texts = reviews(2000)
    write_jsonl(tmp_path / "reviews.jsonl", texts)
    done = run(
        cli, "score", "reviews.jsonl", "--url", service.url, "--out", "results.jsonl", "--poll", "0.2", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "2000/2000 texts" in done.stderr and "100%" in done.stderr and "wrote 2000 results" in done.stderr
    results = read_results(tmp_path / "results.jsonl")
    assert [r["index"] for r in results] == list(range(2000))
    assert all(set(r) == {"index", "label", "score", "probabilities"} for r in results)
    assert all(r["score"] == r["probabilities"][r["label"]] for r in results)
    # written atomically: no state file and no partial file left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl", "reviews.jsonl"]
    with SentimentClient(service.url) as client:
        sample = client.batch([texts[0], texts[1000], texts[1999]])
    for prediction, i in zip(sample, (0, 1000, 1999), strict=True):
        assert results[i]["label"] == prediction.label
        assert results[i]["probabilities"] == pytest.approx(prediction.probabilities, abs=1e-4)
    submitted = re.search(r"submitted job ([0-9a-f-]{36})", done.stderr)
    assert submitted, done.stderr
    job_id = submitted.group(1)
    # the token went with the state file: without it the job is unknown, the admin key reaches it
    unknown = run(cli, "status", job_id, "--url", service.url, cwd=tmp_path)
    assert unknown.returncode == 1 and f"unknown job {job_id}" in unknown.stderr, unknown
    status = run(cli, "status", job_id, "--url", service.url, "--token", ADMIN_KEY, cwd=tmp_path)
    assert status.returncode == 0 and "done  2000/2000 texts (100%)" in status.stdout, status


def test_cli_resumes_after_ctrl_c(service: Service, cli: Path, tmp_path: Path) -> None:
    # enough texts that the job is still being scored when the interrupt comes
    write_jsonl(tmp_path / "reviews.jsonl", reviews(5000))
    args = ("score", "reviews.jsonl", "--url", service.url, "--out", "results.jsonl", "--poll", "0.2")
    state = tmp_path / "results.jsonl.job"
    before = service.job_ids()
    env = {**os.environ, "PYTHONPATH": str(cli)}
    # Ctrl-C's default action in the client, even when this run inherited SIGINT ignored (a shell
    # starts background commands so, and Python then keeps it ignored).
    first = subprocess.Popen(
        command(cli, *args),
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        while not state.exists():
            assert first.poll() is None, f"exited with {first.returncode} before submitting"
            time.sleep(0.05)
        saved = json.loads(state.read_text())
        job_id, token = saved["job_id"], saved["token"]
        assert state.stat().st_mode & 0o777 == 0o600  # it holds the job's token
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130, stderr
    assert f"job {job_id} keeps running" in stderr and "Traceback" not in stderr and token not in stderr
    assert not (tmp_path / "results.jsonl").exists() and state.exists()
    with SentimentClient(service.url) as client:
        assert client.status(job_id, token).status in ("queued", "running", "done")

    again = run(cli, *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"resuming job {job_id}" in again.stderr and "submitted job" not in again.stderr
    results = read_results(tmp_path / "results.jsonl")
    assert [r["index"] for r in results] == list(range(5000)) and not state.exists()
    assert service.job_ids() - before == {job_id}, "the input was submitted twice"
    assert token not in again.stderr
    with SentimentClient(service.url) as client:
        final = client.status(job_id, token)
    assert final.status == "done" and final.done == final.total == 5000

    follow = ("score", "--job-id", job_id, "--url", service.url, "--out", "copy.jsonl")
    refused = run(cli, *follow, cwd=tmp_path)  # no token
    assert refused.returncode == 1 and "unknown job" in refused.stderr
    by_id = subprocess.run(
        command(cli, *follow),
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(cli), "SENTIMENT_JOB_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert by_id.returncode == 0, by_id.stderr
    assert (tmp_path / "copy.jsonl").read_bytes() == (tmp_path / "results.jsonl").read_bytes()
    cancel = run(cli, "cancel", job_id, "--url", service.url, "--token", token, cwd=tmp_path)
    assert cancel.returncode == 1 and "already done" in cancel.stderr and "Traceback" not in cancel.stderr
    assert service.job_ids() - before == {job_id}


def test_cli_plain_text_lines(service: Service, cli: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("Loved every minute of it.\n\nThe worst purchase I ever made.\n")
    done = run(cli, "score", "notes.txt", "--plain", "--url", service.url, "--out", "out.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [r["index"] for r in read_results(tmp_path / "out.jsonl")] == [0, 1]


@pytest.mark.parametrize(
    ("content", "args", "code", "message"),
    [
        ('{"text": "fine"}\n\n{"text": "unfinished"\n', (), 2, "in.jsonl, line 3: not valid JSON"),
        ('{"text": "fine"}\n{"body": "no text key"}\n', (), 2, 'in.jsonl, line 2: expected {"text": "..."}'),
        ('{"text": "fine"}\n{"text": "  "}\n', (), 2, "in.jsonl, line 2: the text is blank"),
        ("just words, no JSON\n", (), 2, "use --plain"),
        ("", (), 2, "in.jsonl: no texts"),
        (None, (), 2, "in.jsonl: no such file"),
        ('{"text": "fine"}\n', ("--out", "missing/out.jsonl"), 2, "missing: no folder"),
    ],
)
def test_cli_refuses_bad_input(
    service: Service,
    cli: Path,
    tmp_path: Path,
    content: str | None,
    args: tuple[str, ...],
    code: int,
    message: str,
) -> None:
    if content is not None:
        (tmp_path / "in.jsonl").write_bytes(content.encode())
    before = service.job_ids()
    done = run(cli, "score", "in.jsonl", "--url", service.url, *(args or ("--out", "out.jsonl")), cwd=tmp_path)
    assert done.returncode == code and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.job").exists()
    assert service.job_ids() == before


def test_cli_reports_service_errors(service: Service, cli: Path, tmp_path: Path) -> None:
    blank = run(cli, "predict", "   ", "--url", service.url, cwd=tmp_path)
    assert blank.returncode == 1 and "HTTP 400" in blank.stderr and "must not be blank" in blank.stderr
    unknown = run(cli, "status", str(uuid.uuid4()), "--url", service.url, cwd=tmp_path)
    assert unknown.returncode == 1 and "HTTP 404" in unknown.stderr and "unknown job" in unknown.stderr
    nobody = f"http://127.0.0.1:{free_port()}"
    down = run(cli, "predict", "fine", "--url", nobody, "--retries", "0", cwd=tmp_path)
    assert down.returncode == 1 and f"cannot reach {nobody}" in down.stderr
    ok = run(cli, "predict", "What a lovely, helpful shop.", "--url", service.url, cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout.split()[0] in ("positive", "negative"), ok
    for result in (blank, unknown, down, ok):
        assert "Traceback" not in result.stderr
