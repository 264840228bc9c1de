"""`python -m loadtests.jobs.beside [--texts 100000] [--duration 10m]`: interactive latency with
and without bulk jobs running, back to back on one instance.

The original plan's baseline scenario (loadtests/run.py: 100 users, 72% repeated texts) runs
twice against one instance (loadtests/run.py's stack: throwaway Redis and PostgreSQL, a
2-worker `bentoml serve` on the store's models), the cache emptied before each run:
1. `without`: nothing else sent to the instance;
2. `with`: jobs of `--texts` unique texts each, submitted before the scenario starts, enough of
   them that one is always running until the scenario ends (they run one after another,
   oldest first); what is left is cancelled afterwards.
Then, with `--again`, `without` once more, so that a machine whose load drifted shows.

The report (report.md, report.json; each run's own Locust report beside them) gives p50, p95 and
p99 of every interactive request and of the answered ones in each run, the `with` run's p95
over the `without` run's (the goal: at most 1.10), the jobs' texts per second during the
scenario and the share of the inference threads' time they took. Output in
var/jobs-beside/<time>/ unless `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from loadtests.harness import MODEL, OUT_OF_SOURCE, REFERENCE, load_texts, log, metric_totals, model_store, stopped
from loadtests.report import markdown as report
from loadtests.report.markdown import table
from loadtests.run import PLAN, parse_duration, redis_flush, run_scenario, start_stack
from tests.support.serving import ROOT

WORKERS = 2
# The job's texts/s can at most reach the raw model's (about 730 on this machine): with this
# rate in the estimate, the jobs queued before a run outlast it.
MAX_TEXTS_PER_S = 1_000
GOAL = 1.10  # the with-jobs p95 over the without-jobs p95, at most
FIGURES = ("requests", "req_s", "p50", "p95", "p99", "answered_p95", "answered_p99", "max", "miss_p95", "hit_p95")


class Jobs:
    """Jobs queued on the instance before a run, followed until it ends: texts done over time."""

    def __init__(self, url: str, size: int, count: int, base: list[str]) -> None:
        self.url, self.size, self.count, self.base = url, size, count, base
        self.ids: list[str] = []
        self.tokens: dict[str, str] = {}  # job id -> its token
        self.timeline: list[tuple[float, int]] = []  # (wall time, texts done over all the jobs)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="jobs", daemon=True)

    def submit(self) -> None:
        for n in range(self.count):
            # unique texts, none of them the scenario's: the corpus's reviews numbered per job
            texts = [f"{self.base[k % len(self.base)]} [job {n} {k}]" for k in range(self.size)]
            r = httpx.post(f"{self.url}/jobs", json={"texts": texts}, timeout=600)
            r.raise_for_status()
            self.ids.append(r.json()["job_id"])
            self.tokens[self.ids[-1]] = r.json()["token"]
            log(f"  job {n + 1}/{self.count} submitted: {self.ids[-1]}")
        self._thread.start()

    def done(self) -> tuple[int, list[str]]:
        total, states = 0, []
        for job_id in self.ids:
            status = httpx.get(f"{self.url}/jobs/{job_id}", headers=self._auth(job_id), timeout=60).json()
            total += status["done"]
            states.append(status["status"])
        return total, states

    def _follow(self) -> None:
        while not self._stop.wait(2.0):
            try:
                self.timeline.append((time.time(), self.done()[0]))
            except httpx.HTTPError:  # a poll that timed out under load: the next one counts
                continue

    def stop(self) -> list[str]:
        """Stop following, cancel what is left; each job's state before the cancel."""
        self._stop.set()
        self._thread.join(timeout=120)
        total, states = self.done()
        self.timeline.append((time.time(), total))
        for job_id, state in zip(self.ids, states, strict=True):
            if state in ("queued", "running"):
                httpx.delete(f"{self.url}/jobs/{job_id}", headers=self._auth(job_id), timeout=60)
        return states

    def _auth(self, job_id: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[job_id]}"}

    def rate(self, start: float, end: float) -> float:
        """Texts per second done between two wall times (the nearest polls inside them)."""
        inside = [(t, d) for t, d in self.timeline if start <= t <= end] or self.timeline
        (t0, d0), (t1, d1) = inside[0], inside[-1]
        return round((d1 - d0) / (t1 - t0), 1) if t1 > t0 else 0.0


BUSY = "sentiment_inference_seconds_sum"


def busy_seconds(url: str) -> float:
    """Seconds the instance's inference threads have spent in forward calls."""
    return metric_totals(url, [BUSY], timeout=30)[BUSY]


def markdown(result: dict[str, Any]) -> str:
    runs = result["runs"]
    lines = [
        f"# Interactive latency beside bulk jobs, {result['started']}",
        "",
        f"`{result['command']}`: the baseline scenario ({result['scenario']}) back to back on one"
        f" 2-worker instance (Redis, PostgreSQL, {result['profile']} models, A `{MODEL}`), the cache"
        " emptied before each run; `with`: jobs of"
        f" {result['job_texts']:,} unique texts queued before the run, one running at every moment.",
        "",
    ]
    header = ("run", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "answered p95", "answered p99", "max ms")
    rows: list[tuple[Any, ...]] = []
    for name, run in runs.items():
        f = run["figures"]
        rows.append((name, f"{f['requests']:,}", f["req_s"], f"{f['p50']:.1f}", f"{f['p95']:.1f}", f"{f['p99']:.1f}"))
        rows[-1] += (f"{f['answered_p95']:.1f}", f"{f['answered_p99']:.1f}", f"{f['max']:.0f}", f"{f['miss_p95']:.1f}")
        rows[-1] += (f"{f['hit_p95']:.1f}", run.get("job_texts_per_s", "–"), f"{run['inference_busy_share']:.0%}")
    lines += table((*header, "miss p95", "hit p95", "job texts/s", "inference busy"), rows)
    ratio = result["p95_ratio"]
    lines += [
        "",
        f"p95 with jobs over p95 without: **{ratio:.3f}** (goal at most {GOAL:.2f}:"
        f" {'met' if ratio <= GOAL else 'not met'}). Jobs finished during the `with` run:"
        f" {result['jobs_finished']} of {result['jobs_submitted']} queued.",
        "",
        "Latency is Locust's, at the client on the same machine; each run's own report is in its"
        " folder. `inference busy`: the share of the inference threads' time spent in forward calls"
        " (`sentiment_inference_seconds`).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=100_000, help="texts per job")
    parser.add_argument("--duration", type=parse_duration, default=None, help="each run (default the plan's)")
    parser.add_argument("--users", type=int, default=None, help="default the plan's")
    parser.add_argument("--again", action="store_true", help="a third run without jobs")
    parser.add_argument("--out", type=Path, default=None, help="default var/jobs-beside/<time>")
    args = parser.parse_args()
    if args.texts <= 0:
        parser.error("--texts must be positive")

    scenario = PLAN["baseline"]
    if args.duration or args.users:
        users, seconds = args.users or scenario.users, args.duration or scenario.duration_s
        scenario = replace(
            scenario,
            users=users,
            duration_s=seconds,
            description=f"{users} users, spawn {scenario.spawn_rate:g}/s, {seconds:g} s",
        )
    started = datetime.now(UTC)
    out = args.out or ROOT / "var" / "jobs-beside" / started.strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    profile, home = model_store()
    os.environ["BENTOML_HOME"] = str(home)
    base = load_texts(ROOT / OUT_OF_SOURCE, 400)
    count = math.ceil((scenario.duration_s + 60) * MAX_TEXTS_PER_S / args.texts)
    env = {
        "SENTIMENT_MODEL": MODEL,
        "AB_MODEL_B": REFERENCE,
        "RATE_LIMIT_JOBS": "0",
        "RATE_LIMIT_JOB_READS": "0",
        "MAX_ACTIVE_JOBS_PER_CLIENT": "1000",
        "MAX_QUEUED_TEXTS_PER_CLIENT": "100000000",
        "MAX_QUEUED_TEXTS": "100000000",
        "MAX_JOB_TEXTS": str(max(args.texts, 100_000)),
        "JOB_RESULT_TTL_SECONDS": "600",
    }
    admin_key = os.environ.get("ADMIN_API_KEY")
    runs: dict[str, dict[str, Any]] = {}
    result: dict[str, Any] = {}
    with stopped() as servers:
        served, roots, redis_url = start_stack(out, WORKERS, servers, env)
        url = served.url
        httpx.post(f"{url}/batch", json={"texts": ["warm up", "the first forward call"]}, timeout=60)
        phases = ["without", "with"] + (["without-again"] if args.again else [])
        jobs: Jobs | None = None
        for name in phases:
            redis_flush(redis_url)
            if name == "with":
                log(f"[with] queueing {count} jobs of {args.texts:,} texts ...")
                jobs = Jobs(url, args.texts, count, base)
                jobs.submit()
                time.sleep(5)  # the first chunks leased: a job runs when the scenario starts
            log(f"[{name}] {scenario.description} against {url}")
            busy0 = busy_seconds(url)
            run = run_scenario(scenario, url, out / name, roots, admin_key, redis_url, WORKERS)
            busy = (busy_seconds(url) - busy0) / ((run["ended"] - run["started"]) * WORKERS)
            built = report.build(out / name)
            log(report.console_summary(built))
            runs[name] = {
                "figures": {k: built["figures"][k] for k in FIGURES},
                "inference_busy_share": round(busy, 3),
                "report": f"{name}/report.md",
            }
            if name == "with" and jobs is not None:
                runs[name]["job_texts_per_s"] = jobs.rate(run["started"], run["ended"])
                states = jobs.stop()
                result["jobs_finished"] = states.count("done")
                result["jobs_submitted"] = len(states)
                log(f"  jobs: {runs[name]['job_texts_per_s']} texts/s during the run; states {states}")

    result.update(
        started=started.isoformat(timespec="seconds"),
        command="python -m loadtests.jobs.beside " + " ".join(sys.argv[1:]),
        scenario=scenario.description,
        profile=profile,
        job_texts=args.texts,
        runs=runs,
        p95_ratio=round(runs["with"]["figures"]["p95"] / runs["without"]["figures"]["p95"], 3),
    )
    (out / "report.json").write_text(json.dumps(result, indent=2))
    (out / "report.md").write_text(markdown(result))
    log((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
