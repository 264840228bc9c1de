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
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from loadtests.abuse.clients import (
    PER_WORKER,
    WINDOW_S,
    Answer,
    Case,
    Jobs,
    count,
    memory_cases,
    post_head,
    quiet,
    raw_request,
    repeated,
    run_concurrently,
    texts,
    watched,
)
from loadtests.harness import log, metric_totals, model_store, stopped
from loadtests.report.markdown import table
from tests.support.jobs import done_job
from tests.support.serving import ROOT

WORKERS = 2
# The suite's instance: short timeouts so the run stays short, a global queue cap a few jobs reach.
SUITE_ENV = {
    "JOB_UPLOAD_TIMEOUT_SECONDS": "30",
    "JOB_SEND_TIMEOUT_SECONDS": "10",
    "MAX_QUEUED_TEXTS": "400000",
}


# --- the cases ----------------------------------------------------------------------------------


def quota_cases(url: str, root_pid: int, jobs: Jobs) -> list[Case]:
    flood = Case("one client floods jobs", "100,000-text jobs in a loop from one client, 12 submissions")
    with watched(flood, url, root_pid):
        answers = [jobs.submit(texts(100_000, f"flood {i}"), "198.18.20.1") for i in range(12)]
    flood.statuses = count(r.status_code for r in answers)
    refused = [r for r in answers if r.status_code == 429]
    flood.came_back = "; ".join(
        sorted({f"{r.json()['error'][:110]} (Retry-After {r.headers.get('retry-after')})" for r in refused})
    )[:400]

    many = Case("many clients, each under its limits", "one 100,000-text job from each of up to 6 other clients")
    start = time.perf_counter()
    answers = []
    for n in range(6):
        answers.append(jobs.submit(texts(100_000, f"client {n}"), f"198.18.21.{n}"))
        if answers[-1].status_code == 503:
            break
    many.seconds = round(time.perf_counter() - start, 2)
    many.statuses = count(r.status_code for r in answers)
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
    with watched(case, url, root_pid) as span:
        start = span["start"]
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
        span["end"] = time.perf_counter()
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
    return case


def flood_reads(
    url: str, root_pid: int, name: str, sent: str, token_of: Callable[[int], str], job: str, subnet: int
) -> Case:
    case = Case(name, sent)
    answers: list[int] = []
    lock = threading.Lock()
    with watched(case, url, root_pid) as span:
        deadline = span["start"] + WINDOW_S

        def poller(n: int) -> None:
            with httpx.Client(timeout=60) as http:
                while time.perf_counter() < deadline:
                    headers = {"Authorization": f"Bearer {token_of(n)}", "X-Forwarded-For": f"198.18.{subnet}.{n + 1}"}
                    status = http.get(f"{url}/jobs/{job}", headers=headers).status_code
                    with lock:
                        answers.append(status)

        with cf.ThreadPoolExecutor(20) as pool:
            list(pool.map(poller, range(20)))
    case.statuses = count(answers)
    case.came_back = ", ".join(f"{n} x {s}" for s, n in sorted(case.statuses.items()))
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
    cases: list[Case] = []
    with stopped() as started:
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
    ]
    header = ("case", "sent", "came back", "worker peak RSS over idle", "`/predict` p95 beside (x quiet)")
    rows: list[tuple[Any, ...]] = []
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
        rows.append((c.name, c.sent, came, growth, p95, c.failed or ""))
    lines += table((*header, "failed beside"), rows)
    if before:
        lines += ["", f"## Before: the same memory cases on {meta['before']}", ""]
        quiet_before = before[0].p95_ms
        rows = []
        for c in before:
            ratio = f" (x{c.p95_ms / quiet_before:.2f})" if c.p95_ms and quiet_before else ""
            statuses = ", ".join(f"{n} x {s}" for s, n in sorted(c.statuses.items()))
            rows.append((c.name, f"{statuses}: {c.came_back}", f"{c.peak_growth_mb} MB", f"{c.p95_ms} ms{ratio}"))
            rows[-1] += (c.failed or "",)
        lines += table((*header[:1], *header[2:], "failed beside"), rows)
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
