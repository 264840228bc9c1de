"""The abuse suite's clients: the interactive traffic that runs beside each case and the workers'
memory it watches (`watched`), raw HTTP for bodies no client library would send, the 64 MiB
pathological bodies, and the jobs the suite submits.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
import select
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil

from loadtests.harness import percentile

MIB = 1 << 20
BODY = 64 * MIB  # MAX_JOB_BODY_BYTES' default: the largest body the service takes in
PER_WORKER = 4  # hostile clients at once per worker
WINDOW_S = 15.0  # a case that lasts as long as it is given


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


def tally_answers(answers: list[Answer]) -> tuple[dict[str, int], str]:
    statuses: dict[str, int] = {}
    for a in answers:
        statuses[str(a.status)] = statuses.get(str(a.status), 0) + 1
    example = next((a for a in answers if a.status >= 400), answers[0] if answers else None)
    message = "" if example is None else str(example.body.get("error", example.body))[:160]
    return statuses, message


def count(statuses: Iterable[Any]) -> dict[str, int]:
    """How many of each status, keyed by its text."""
    return dict(Counter(str(s) for s in statuses))


@contextmanager
def watched(case: Case, url: str, root_pid: int, settle_s: float = 2) -> Iterator[dict[str, float]]:
    """The interactive traffic and the workers' memory around a case: the body's `span` start and
    end (perf_counter; left as entered and exited unless the body sets them) fill the case's
    seconds, its p95 beside and its peak memory."""
    with Interactive(url) as traffic, Memory(root_pid) as memory:
        time.sleep(settle_s)
        span = {"start": time.perf_counter()}
        yield span
        span.setdefault("end", time.perf_counter())
    case.seconds = round(span["end"] - span["start"], 2)
    case.p95_ms, case.requests, case.failed = traffic.p95_ms(span["start"], span.get("p95_end", span["end"]))
    case.peak_growth_mb, case.idle_rss_mb = memory.growth_mb, memory.idle_mb


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
    with watched(case, url, root_pid) as span:
        with cf.ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(lambda n: send(port, n), range(clients)))
        span["end"] = time.perf_counter()
        span["p95_end"] = span["end"] + 1  # the second after it, below
        time.sleep(1)
    case.statuses, case.came_back = tally_answers(answers)
    case.notes.append(
        f"slowest answer {max(a.seconds for a in answers):.2f} s,"
        f" {max(a.sent for a in answers) / MIB:.1f} MiB sent at most"
    )
    return case


def quiet(url: str, root_pid: int, seconds: float = WINDOW_S) -> Case:
    case = Case("quiet (interactive traffic alone)", "nothing but the interactive traffic")
    with watched(case, url, root_pid):
        time.sleep(seconds)
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
