"""`make abuse`: hostile clients against a served instance on Redis and PostgreSQL.

Each case states what it sent, what came back, the workers' peak resident memory above their
memory just before it, and the p95 of interactive `/predict` traffic that runs beside it (four
closed-loop clients, half repeated texts, half new ones) against the same traffic alone. The
report is markdown and JSON in `--out` (docs/abuse.md is one such report).

    python -m loadtests.abuse [--out DIR] [--before DIR]

`--before DIR` runs the memory cases against the checkout in DIR too (an earlier version, e.g. a
`git worktree`), on backends of its own, for a before/after table. The instance uses the store's
full models when they are built, else the quick ones (built into var/bentoml-quick).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import select
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from loadtests.bench import metric_totals
from loadtests.chaos.tally import percentile
from loadtests.jobs_bench import model_store
from tests.support.jobs import done_job

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
BODY = 64 * MIB  # MAX_JOB_BODY_BYTES' default: the largest body the service takes in
PER_WORKER = 4
WORKERS = 2
WINDOW_S = 15.0
# The suite's instance: short timeouts so the run stays short, a global queue cap a few jobs reach.
SUITE_ENV = {
    "JOB_UPLOAD_TIMEOUT_SECONDS": "30",
    "JOB_SEND_TIMEOUT_SECONDS": "10",
    "MAX_QUEUED_TEXTS": "400000",
}


def log(msg: str) -> None:
    print(msg, flush=True)


# --- what the instance does meanwhile ---------------------------------------------------------


class Interactive:
    """Four clients posting /predict back to back, each request from one of 500 addresses (so
    no address nears its rate limit), half of the texts repeated, half new."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.clients = clients
        self.samples: list[tuple[float, float, int]] = []  # (start, seconds, status)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Interactive:
        for n in range(self.clients):
            thread = threading.Thread(target=self._client, args=(n,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _client(self, n: int) -> None:
        rng = random.Random(n)
        with httpx.Client(base_url=self.url, timeout=60) as http:
            i = 0
            while not self._stop.is_set():
                i += 1
                repeated = rng.random() < 0.5
                text = f"Review {rng.randrange(100)}: it was fine" if repeated else f"New review {uuid.uuid4()}"
                ip = f"198.51.{rng.randrange(2)}.{rng.randrange(1, 251)}"
                start = time.perf_counter()
                try:
                    status = http.post("/predict", json={"text": text}, headers={"X-Forwarded-For": ip}).status_code
                except httpx.HTTPError:
                    status = 0
                self.samples.append((start, time.perf_counter() - start, status))
                time.sleep(0.01)

    def p95_ms(self, start: float, end: float) -> tuple[float | None, int, int]:
        """p95 of the requests started in [start, end), their count, and how many failed."""
        inside = [(s, st) for t, s, st in self.samples if start <= t < end]
        p95 = percentile([s for s, st in inside if st == 200], 0.95)
        return (None if p95 is None else round(p95 * 1000, 1)), len(inside), sum(st != 200 for _, st in inside)


class Memory:
    """The resident memory of the instance's worker processes, sampled every 20 ms."""

    def __init__(self, root_pid: int) -> None:
        self.root = psutil.Process(root_pid)
        self.peak: dict[int, int] = {}
        self.start: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def workers(self) -> list[psutil.Process]:
        return [p for p in self.root.children(recursive=True) if "worker" in " ".join(p.cmdline())]

    def __enter__(self) -> Memory:
        self.start = {p.pid: p.memory_info().rss for p in self.workers()}
        self.peak = dict(self.start)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            for pid in self.start:
                try:
                    rss = psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    continue
                self.peak[pid] = max(self.peak[pid], rss)

    @property
    def growth_mb(self) -> float:
        """The largest growth of one worker over its memory at the start, MB."""
        return round(max((self.peak[p] - self.start[p] for p in self.start), default=0) / MIB, 1)

    @property
    def idle_mb(self) -> float:
        return round(max(self.start.values(), default=0) / MIB, 1)


# --- raw HTTP, for bodies no client library would send ----------------------------------------


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    sent: int
    seconds: float
    headers: dict[str, str] = field(default_factory=dict)


def raw_request(
    port: int, head: str, body: Iterator[bytes], chunked: bool = False, rate_bps: float | None = None
) -> Answer:
    """Send `head` and then `body` (chunked if asked, at most `rate_bps` bytes a second), stop
    sending as soon as an answer arrives, and read the answer."""
    started = time.perf_counter()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=300) as sock:
        sock.sendall(head.encode())
        answered = False
        for piece in body:
            if not piece:
                continue  # an empty chunk would end a chunked body
            if select.select([sock], [], [], 0)[0]:
                answered = True
                break
            data = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
            try:
                sock.sendall(data)
            except OSError:  # the service closed the connection after answering
                answered = True
                break
            sent += len(piece)
            if rate_bps:
                time.sleep(len(piece) / rate_bps)
        if not answered and chunked:
            sock.sendall(b"0\r\n\r\n")
        raw = b""
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            raw += data
            head_end = raw.find(b"\r\n\r\n")
            if head_end >= 0:
                headers = _headers(raw[:head_end])
                if len(raw) - head_end - 4 >= int(headers.get("content-length", "0")):
                    break
    seconds = time.perf_counter() - started
    if b"\r\n\r\n" not in raw:
        return Answer(0, {"error": "no answer"}, sent, seconds)
    head_bytes, payload = raw.split(b"\r\n\r\n", 1)
    try:
        parsed = json.loads(payload)
    except ValueError:
        parsed = {"raw": payload[:200].decode(errors="replace")}
    return Answer(int(head_bytes.split(b" ", 2)[1]), parsed, sent, seconds, _headers(head_bytes))


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode(errors="replace").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


def post_head(path: str, ip: str, content_type: str, length: int | None, extra: str = "") -> str:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST {path} HTTP/1.1\r\nHost: abuse\r\nContent-Type: {content_type}\r\nX-Forwarded-For: {ip}\r\n"
        f"{extra}{framing}\r\n\r\n"
    )


def repeated(prefix: bytes, unit: bytes, total: int, piece: int = MIB) -> Iterator[bytes]:
    """`prefix`, then `unit` over and over, `total` bytes in all, a `piece` at a time."""
    yield prefix
    left = total - len(prefix)
    block = unit * max(1, piece // len(unit))
    while left > 0:
        out = block[:left]
        left -= len(out)
        yield out


# --- the cases ----------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    sent: str
    came_back: str = ""
    statuses: dict[str, int] = field(default_factory=dict)
    peak_growth_mb: float | None = None
    idle_rss_mb: float | None = None
    p95_ms: float | None = None
    requests: int = 0
    failed: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _tally(answers: list[Answer]) -> tuple[dict[str, int], str]:
    statuses: dict[str, int] = {}
    for a in answers:
        statuses[str(a.status)] = statuses.get(str(a.status), 0) + 1
    example = next((a for a in answers if a.status >= 400), answers[0] if answers else None)
    message = "" if example is None else str(example.body.get("error", example.body))[:160]
    return statuses, message


def memory_cases() -> list[tuple[str, str, Callable[[int, int], Answer]]]:
    """(name, what is sent, how one client sends it): 64 MiB pathological bodies."""

    def tiny_items(port: int, n: int) -> Answer:
        head = post_head("/jobs", f"198.18.10.{n}", "application/json", BODY)
        return raw_request(port, head, _exactly(repeated(b'{"texts": [', b'"a",', BODY), BODY))

    def deep_nesting(port: int, n: int) -> Answer:
        head = post_head("/jobs", f"198.18.11.{n}", "application/json", BODY)
        return raw_request(port, head, _exactly(repeated(b'{"texts": ', b"[", BODY), BODY))

    def short_lines(port: int, n: int) -> Answer:
        head = post_head("/jobs", f"198.18.12.{n}", "application/x-ndjson", BODY)
        return raw_request(port, head, _exactly(repeated(b"", b'{"text":"a"}\n', BODY), BODY))

    def chunked_long_texts(port: int, n: int) -> Answer:
        line = json.dumps({"text": "word " * 800}).encode() + b"\n"  # 4,000 characters a text
        head = post_head("/jobs", f"198.18.13.{n}", "application/x-ndjson", None)
        return raw_request(port, head, repeated(b"", line, BODY + 16 * MIB, 64 * 1024), chunked=True)

    return [
        ("10 million tiny items", '`{"texts": ["a","a",...]}`, 64 MiB with Content-Length', tiny_items),
        ("deep nesting", '`{"texts": [[[[...`, 64 MiB of `[` with Content-Length', deep_nesting),
        ("NDJSON of short lines", '`{"text":"a"}` a line, 64 MiB with Content-Length', short_lines),
        ("chunked, no length", "NDJSON of 4,000-character texts, 80 MiB chunked without a length", chunked_long_texts),
    ]


def _exactly(pieces: Iterator[bytes], total: int) -> Iterator[bytes]:
    """`pieces` cut or padded with spaces to `total` bytes (the Content-Length sent)."""
    left = total
    for piece in pieces:
        if left <= 0:
            return
        yield piece[:left]
        left -= len(piece[:left])
    while left > 0:
        yield b" " * min(left, MIB)
        left -= min(left, MIB)


def run_concurrently(
    url: str, port: int, root_pid: int, name: str, sent: str, send: Callable[[int, int], Answer], clients: int
) -> Case:
    case = Case(name, f"{clients} at once ({PER_WORKER} per worker): {sent}")
    with Interactive(url) as traffic, Memory(root_pid) as memory:
        time.sleep(2)
        start = time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(lambda n: send(port, n), range(clients)))
        end = time.perf_counter()
        time.sleep(1)
    case.seconds = round(end - start, 2)
    case.statuses, case.came_back = _tally(answers)
    case.peak_growth_mb, case.idle_rss_mb = memory.growth_mb, memory.idle_mb
    case.p95_ms, case.requests, case.failed = traffic.p95_ms(start, end + 1)
    case.notes.append(
        f"slowest answer {max(a.seconds for a in answers):.2f} s,"
        f" {max(a.sent for a in answers) / MIB:.1f} MiB sent at most"
    )
    return case


def quiet(url: str, root_pid: int, seconds: float = WINDOW_S) -> Case:
    case = Case("quiet (interactive traffic alone)", "nothing but the interactive traffic")
    with Interactive(url) as traffic, Memory(root_pid) as memory:
        time.sleep(2)
        start = time.perf_counter()
        time.sleep(seconds)
        end = time.perf_counter()
    case.seconds = round(end - start, 2)
    case.p95_ms, case.requests, case.failed = traffic.p95_ms(start, end)
    case.peak_growth_mb, case.idle_rss_mb = memory.growth_mb, memory.idle_mb
    return case


class Jobs:
    """Jobs submitted by the suite: their tokens, to follow and cancel them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.tokens: dict[str, str] = {}

    def submit(self, texts: list[str], ip: str) -> httpx.Response:
        r = httpx.post(f"{self.url}/jobs", json={"texts": texts}, headers={"X-Forwarded-For": ip}, timeout=300)
        if r.status_code == 202:
            self.tokens[r.json()["job_id"]] = r.json()["token"]
        return r

    def auth(self, job_id: str, ip: str = "198.18.99.1") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[job_id]}", "X-Forwarded-For": ip}

    def status(self, job_id: str, ip: str = "198.18.99.1") -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/jobs/{job_id}", headers=self.auth(job_id, ip), timeout=60).json())

    def cancel_all(self) -> None:
        for n, job_id in enumerate(self.tokens):
            httpx.delete(f"{self.url}/jobs/{job_id}", headers=self.auth(job_id, f"198.18.98.{n % 250}"), timeout=60)

    def wait_done(self, job_id: str, ip: str, timeout: float = 600) -> float:
        started = time.perf_counter()
        while (status := self.status(job_id, ip))["status"] in ("queued", "running"):
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"job {job_id}: {status}")
            time.sleep(0.1)
        return time.perf_counter() - started


def texts(n: int, tag: str) -> list[str]:
    return [f"Review {i} of {tag}: {'great value' if i % 2 else 'broke in a week'}" for i in range(n)]


def quota_cases(url: str, root_pid: int, jobs: Jobs) -> list[Case]:
    flood = Case("one client floods jobs", "100,000-text jobs in a loop from one client, 12 submissions")
    with Interactive(url) as traffic, Memory(root_pid) as memory:
        time.sleep(2)
        start = time.perf_counter()
        answers = [jobs.submit(texts(100_000, f"flood {i}"), "198.18.20.1") for i in range(12)]
        end = time.perf_counter()
    flood.seconds = round(end - start, 2)
    flood.statuses = {}
    for r in answers:
        flood.statuses[str(r.status_code)] = flood.statuses.get(str(r.status_code), 0) + 1
    refused = [r for r in answers if r.status_code == 429]
    flood.came_back = "; ".join(
        sorted({f"{r.json()['error'][:110]} (Retry-After {r.headers.get('retry-after')})" for r in refused})
    )[:400]
    flood.p95_ms, flood.requests, flood.failed = traffic.p95_ms(start, end)
    flood.peak_growth_mb, flood.idle_rss_mb = memory.growth_mb, memory.idle_mb

    many = Case("many clients, each under its limits", "one 100,000-text job from each of up to 6 other clients")
    start = time.perf_counter()
    answers = []
    for n in range(6):
        answers.append(jobs.submit(texts(100_000, f"client {n}"), f"198.18.21.{n}"))
        if answers[-1].status_code == 503:
            break
    many.seconds = round(time.perf_counter() - start, 2)
    for r in answers:
        many.statuses[str(r.status_code)] = many.statuses.get(str(r.status_code), 0) + 1
    last = answers[-1]
    many.came_back = (
        f"{last.status_code} {last.json().get('error', '')[:140]} (Retry-After {last.headers.get('retry-after')})"
    )
    jobs.cancel_all()
    return [flood, many]


def fairness(url: str, jobs: Jobs) -> Case:
    """A 1,000-text job alone, then behind another client's 100,000-text job (no interactive
    traffic: jobs run on idle capacity)."""
    case = Case("a small job behind a large one", "client B's 1,000-text job alone, then behind client A's 100,000")
    small = jobs.submit(texts(1000, "alone"), "198.18.30.2")
    alone = jobs.wait_done(small.json()["job_id"], "198.18.30.2")
    large = jobs.submit(texts(100_000, "large"), "198.18.30.1")
    large_id = large.json()["job_id"]
    while jobs.status(large_id, "198.18.30.1")["done"] == 0:  # A's job is being scored
        time.sleep(0.05)
    small = jobs.submit(texts(1000, "behind"), "198.18.30.2")
    behind = jobs.wait_done(small.json()["job_id"], "198.18.30.2")
    progress = jobs.status(large_id, "198.18.30.1")
    jobs.cancel_all()
    case.came_back = (
        f"alone {alone:.2f} s; behind the large job {behind:.2f} s (x{behind / alone:.2f}); the large job had"
        f" {progress['done']} of 100,000 done meanwhile"
    )
    case.statuses = {"ratio": round(behind / alone, 2)}  # type: ignore[dict-item]
    return case


def ownership(url: str, jobs: Jobs) -> Case:
    case = Case("tokens", "status, results and cancel without a token, with another job's, with its own")
    mine = jobs.submit(["an owned job"], "198.18.40.1").json()
    other = jobs.submit(["another job"], "198.18.40.2").json()
    jobs.wait_done(mine["job_id"], "198.18.40.1")
    base = f"{url}/jobs/{mine['job_id']}"
    outcomes = {}
    for who, token in (("none", None), ("other's", other["token"]), ("own", mine["token"])):
        headers = {"X-Forwarded-For": "198.18.40.3"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        outcomes[who] = [
            httpx.get(base, headers=headers, timeout=60).status_code,
            httpx.get(f"{base}/results", headers=headers, timeout=60).status_code,
            httpx.delete(base, headers=headers, timeout=60).status_code,
        ]
    case.came_back = "; ".join(f"{who} token: {codes}" for who, codes in outcomes.items())
    case.notes.append("own token: DELETE of a done job is 409 (already done), as before")
    return case


def cut_readers(url: str) -> float:
    return metric_totals(url, ("sentiment_job_readers_cut_total",))["sentiment_job_readers_cut_total"]


def slow_readers(url: str, port: int, root_pid: int, database_url: str, readers: int = 50) -> Case:
    case = Case("readers that stop reading", f"{readers} clients open a 100,000-line result stream and read nothing")
    job_id, token = done_job(database_url, 100_000, "198.18.50.1")
    before = cut_readers(url)
    socks = []
    with Interactive(url) as traffic, Memory(root_pid) as memory:
        time.sleep(2)
        start = time.perf_counter()
        for n in range(readers):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(
                f"GET /jobs/{job_id}/results HTTP/1.1\r\nHost: abuse\r\nAuthorization: Bearer {token}\r\n"
                f"X-Forwarded-For: 198.18.51.{n + 1}\r\n\r\n".encode()
            )
            socks.append(sock)
        for sock in socks:  # the status line only: the stream behind it is left unread
            sock.settimeout(30)
            status = sock.recv(12).split(b" ")[1].decode()
            case.statuses[status] = case.statuses.get(status, 0) + 1
        admitted = case.statuses.get("200", 0)
        while cut_readers(url) - before < admitted and time.perf_counter() - start < 120:
            time.sleep(0.2)
        freed = time.perf_counter() - start
        end = time.perf_counter()
        after = httpx.get(
            f"{url}/jobs/{job_id}", headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": "198.18.52.1"}
        ).status_code
    for sock in socks:
        sock.close()
    cut = int(cut_readers(url) - before)
    case.came_back = (
        f"{cut} of the {admitted} streams begun cut off, every slot free {freed:.1f} s after they connected"
        f" (JOB_SEND_TIMEOUT_SECONDS 10); a status read then: {after}"
    )
    case.seconds = round(end - start, 2)
    case.p95_ms, case.requests, case.failed = traffic.p95_ms(start, end)
    case.peak_growth_mb, case.idle_rss_mb = memory.growth_mb, memory.idle_mb
    return case


def flood_reads(
    url: str, root_pid: int, name: str, sent: str, token_of: Callable[[int], str], job: str, subnet: int
) -> Case:
    case = Case(name, sent)
    answers: list[int] = []
    lock = threading.Lock()
    with Interactive(url) as traffic, Memory(root_pid) as memory:
        time.sleep(2)
        start = time.perf_counter()
        deadline = start + WINDOW_S

        def poller(n: int) -> None:
            with httpx.Client(timeout=60) as http:
                while time.perf_counter() < deadline:
                    headers = {"Authorization": f"Bearer {token_of(n)}", "X-Forwarded-For": f"198.18.{subnet}.{n + 1}"}
                    status = http.get(f"{url}/jobs/{job}", headers=headers).status_code
                    with lock:
                        answers.append(status)

        with cf.ThreadPoolExecutor(20) as pool:
            list(pool.map(poller, range(20)))
        end = time.perf_counter()
    for status in answers:
        case.statuses[str(status)] = case.statuses.get(str(status), 0) + 1
    case.came_back = ", ".join(f"{n} x {s}" for s, n in sorted(case.statuses.items()))
    case.seconds = round(end - start, 2)
    case.p95_ms, case.requests, case.failed = traffic.p95_ms(start, end)
    case.peak_growth_mb, case.idle_rss_mb = memory.growth_mb, memory.idle_mb
    return case


def trickles(url: str, port: int, root_pid: int, clients: int = 16) -> Case:
    def send(port: int, n: int) -> Answer:
        head = post_head("/jobs", f"198.18.70.{n}", "application/json", 10_000)
        return raw_request(port, head, repeated(b'{"texts": ["', b"a", 10_000, 10), rate_bps=20)

    return run_concurrently(
        url, port, root_pid, "slow trickled uploads", "20 bytes a second of a 10 kB body", send, clients
    )


# --- the run ------------------------------------------------------------------------------------


GROUPS = ("memory", "trickles", "quotas", "fairness", "ownership", "readers", "polls")


def run_suite(out: Path, source: Path, groups: Sequence[str], label: str) -> list[Case]:
    """The cases of `groups` (GROUPS), between two quiet windows, against one served instance."""
    from tests.support.servers import serve_on_backends

    _profile, home = model_store()
    started: list = []
    cases: list[Case] = []
    try:
        env = {"BENTOML_HOME": str(home), "TRUSTED_PROXIES": "127.0.0.1", **SUITE_ENV}
        (out / label).mkdir(parents=True, exist_ok=True)
        log(f"[{label}] starting Redis, PostgreSQL and the service from {source} ...")
        served, _redis, _postgres = serve_on_backends(out / label, started, env, WORKERS, source)
        assert served.proc is not None
        url, port, root = served.url, served.port, served.proc.pid
        jobs = Jobs(url)
        log(f"[{label}] quiet window")
        cases.append(quiet(url, root))
        if "memory" in groups:
            for name, sent, send in memory_cases():
                log(f"[{label}] {name}")
                cases.append(run_concurrently(url, port, root, name, sent, send, PER_WORKER * WORKERS))
        if "trickles" in groups:
            log(f"[{label}] trickled uploads")
            cases.append(trickles(url, port, root))
        if "quotas" in groups:
            log(f"[{label}] quotas")
            cases += quota_cases(url, root, jobs)
        if "fairness" in groups:
            log(f"[{label}] fairness")
            cases.append(fairness(url, jobs))
        if "ownership" in groups:
            log(f"[{label}] ownership")
            cases.append(ownership(url, jobs))
        if "readers" in groups:
            log(f"[{label}] slow readers")
            cases.append(slow_readers(url, port, root, served.env["DATABASE_URL"]))
        if "polls" in groups:
            polled = jobs.submit(["a job polled too often"], "198.18.61.1").json()
            log(f"[{label}] status poll flood")
            cases.append(
                flood_reads(
                    url,
                    root,
                    "status poll flood",
                    "20 clients polling one job's status back to back",
                    lambda n: polled["token"],
                    polled["job_id"],
                    60,
                )
            )
            log(f"[{label}] invalid tokens")
            cases.append(
                flood_reads(
                    url,
                    root,
                    "invalid tokens",
                    "20 clients guessing a job's token back to back",
                    lambda n: uuid.uuid4().hex,
                    polled["job_id"],
                    62,
                )
            )
        cases.append(quiet(url, root))
        cases[-1].name = "quiet again, at the end"
        return cases
    finally:
        for proc in reversed(started):
            try:
                proc.stop()
            except Exception as exc:  # keep tearing down the rest
                log(f"stopping {type(proc).__name__}: {exc}")


def markdown(after: list[Case], before: list[Case] | None, meta: dict[str, Any]) -> str:
    quiet_p95 = after[0].p95_ms
    lines = [
        "# Hostile clients (`make abuse`)",
        "",
        f"Measured {meta['when']} on {meta['machine']}, commit {meta['commit']}, {meta['profile']} models,"
        f" {WORKERS} workers on Redis and"
        f" PostgreSQL, with `{json.dumps(SUITE_ENV)}` (short timeouts so the run stays short). Beside each case,"
        " four clients post `/predict` back to back (half repeated texts, half new ones); p95 is theirs during the"
        " case,"
        f" against {quiet_p95} ms with the traffic alone. Memory is the largest growth of one worker's resident"
        " memory over its value just before the case.",
        "",
        "| case | sent | came back | worker peak RSS over idle | `/predict` p95 beside (x quiet) | failed beside |",
        "|---|---|---|---|---|---|",
    ]
    for c in after:
        ratio = f" (x{c.p95_ms / quiet_p95:.2f})" if c.p95_ms and quiet_p95 else ""
        growth = "" if c.peak_growth_mb is None else f"{c.peak_growth_mb} MB"
        p95 = "" if c.p95_ms is None else f"{c.p95_ms} ms{ratio}"
        statuses = ", ".join(f"{n} x {s}" for s, n in sorted(c.statuses.items()))
        came = (
            f"{statuses}: {c.came_back}"
            if statuses and c.came_back and "x" not in c.came_back[:3]
            else c.came_back or statuses
        )
        lines.append(f"| {c.name} | {c.sent} | {came} | {growth} | {p95} | {c.failed or ''} |")
    if before:
        lines += [
            "",
            f"## Before: the same memory cases on {meta['before']}",
            "",
            "| case | came back | worker peak RSS over idle | `/predict` p95 beside (x quiet) | failed beside |",
            "|---|---|---|---|---|",
        ]
        quiet_before = before[0].p95_ms
        for c in before:
            ratio = f" (x{c.p95_ms / quiet_before:.2f})" if c.p95_ms and quiet_before else ""
            statuses = ", ".join(f"{n} x {s}" for s, n in sorted(c.statuses.items()))
            growth = f"{c.peak_growth_mb} MB"
            lines.append(
                f"| {c.name} | {statuses}: {c.came_back} | {growth} | {c.p95_ms} ms{ratio} | {c.failed or ''} |"
            )
    notes = [n for c in after for n in (f"{c.name}: {x}" for x in c.notes)]
    if notes:
        lines += ["", "Notes:", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def _commit(checkout: Path) -> str:
    done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="default var/abuse/<time>")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="a setting of the served instance (repeatable)"
    )
    parser.add_argument(
        "--cases", default=",".join(GROUPS), help=f"comma-separated groups of cases (default all: {','.join(GROUPS)})"
    )
    parser.add_argument(
        "--before", type=Path, default=None, help="a checkout of an earlier version: memory cases there too"
    )
    args = parser.parse_args(argv)
    SUITE_ENV.update(pair.split("=", 1) for pair in args.env)
    groups = [g.strip() for g in args.cases.split(",") if g.strip()]
    if unknown := set(groups) - set(GROUPS):
        parser.error(f"unknown groups {sorted(unknown)}; choose among {', '.join(GROUPS)}")
    out = args.out or ROOT / "var" / "abuse" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    before = run_suite(out, args.before, ["memory"], "before") if args.before else None
    after = run_suite(out, ROOT, groups, "after")
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    meta = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{psutil.cpu_count()} cores ({cpu}), {round(psutil.virtual_memory().total / 2**30)} GiB",
        "profile": model_store()[0],
        "commit": _commit(ROOT),
        "before": f"commit {_commit(args.before)}" if args.before else "",
    }
    report = markdown(after, before, meta)
    (out / "report.md").write_text(report)
    (out / "report.json").write_text(
        json.dumps(
            {"meta": meta, "after": [asdict(c) for c in after], "before": [asdict(c) for c in before or []]}, indent=2
        )
    )
    print(report)
    print(f"report: {out}/report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
