"""Faults under load: is every answered prediction stored, once, whatever breaks?

    python -m loadtests.chaos [--profile full|quick] [--out DIR] [--source CHECKOUT]

`make chaos [PROFILE=quick]` calls this. It starts throwaway Redis and PostgreSQL servers and a
2-worker `bentoml serve` on them (rate limits off, a SPILL_DIR of its own, the models of the
BentoML store in $BENTOML_HOME or ~/bentoml), runs Locust headless (locustfile.py beside this
file) for the whole run and, meanwhile, the profile's faults (plan.py): Redis hung, Redis
killed, PostgreSQL stopped at once, PostgreSQL black-holed, a worker killed, the service
restarted. After the load it waits for the analytics writer to drain, stops the service with
SIGTERM and compares the request ids of every answer with the `predictions` table.

The report (report.md, report.json, timeline.png) goes to <out>, var/chaos/<time> unless --out.
Exit status 1 when an answered prediction has no row, an id was answered or stored twice, a
5xx other than a shed (503 with Retry-After) was answered, or a fault could not be injected.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from loadtests.chaos import faults, report, tally
from loadtests.chaos.plan import PROFILES, Profile
from tests.support.servers import PostgresServer, serve_on_backends
from tests.support.serving import ROOT, Managed

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
WORKERS = 2


def log(msg: str) -> None:
    print(msg, flush=True)


def start_locust(profile: Profile, url: str, out: Path) -> subprocess.Popen[bytes]:
    """Locust headless with no run time: it runs until SIGTERMed, which ends it cleanly."""
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--exit-code-on-error",
        "0",
        "--stop-timeout",
        "30",  # users finish the request they are in; a cut one would look unanswered
        "-u",
        str(profile.users),
        "-r",
        str(profile.spawn_rate),
        "--host",
        url,
        "--records",
        str(out / "records-0.jsonl"),
    ]
    with (out / "locust.log").open("wb") as out_log:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out_log, stderr=subprocess.STDOUT)


def stop_locust(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def code_version(source: Path) -> dict[str, Any]:
    """The commit the service ran from, and its files under service/ and storage/ that differ."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else ""

    # porcelain lines are "XY path": the status columns may be blank, so nothing is stripped first
    changed = git("status", "--porcelain", "--", "service", "storage").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "uncommitted": [line[3:] for line in changed]}


def run(profile: Profile, out: Path, source: Path = ROOT) -> int:
    started: list[Managed] = []
    locust: subprocess.Popen[bytes] | None = None
    try:
        log(f"starting Redis, PostgreSQL and bentoml serve ({WORKERS} workers) ...")
        # each one's stop registered before its start: a failed start is stopped too
        limits_off = {"RATE_LIMIT_PREDICT": "0", "RATE_LIMIT_BATCH": "0"}
        served, redis_server, postgres = serve_on_backends(out, started, limits_off, WORKERS, source)
        stack = faults.Stack(redis_server, postgres, served)

        log(f"load: {profile.users} users against {served.url}, faults on a timeline")
        load_before = round(os.getloadavg()[0], 2)
        t0 = time.time()
        started_utc = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        locust = start_locust(profile, served.url, out)
        windows = faults.run_timeline(profile.faults, stack, t0, log)
        end = max(t0 + profile.duration_s, (windows[-1].end if windows else t0) + profile.tail_s)
        time.sleep(max(0.0, end - time.time()))
        stop_locust(locust)
        load_s = time.time() - t0
        log(f"[{load_s:6.1f} s] load stopped; waiting for the analytics writer to drain")

        engine = sa.create_engine(postgres.url)
        drain = tally.wait_drained(engine, f"{served.url}/metrics", profile.drain_timeout_s, log=log)
        served.stop()  # SIGTERM: the shutdown hooks write (or spill) whatever is left
        stored = tally.stored_ids(engine)
        engine.dispose()
        figures = tally.tally(tally.read_records(out), stored, windows, t0)
        result: dict[str, Any] = {
            "profile": {"name": profile.name, "users": profile.users, "duration_s": profile.duration_s},
            "started_utc": started_utc,
            "load_s": round(load_s, 1),
            "workers": WORKERS,
            # the 1-minute load average: what else the cores were doing (a shared machine)
            "machine": {"cpus": os.cpu_count(), "load_before": load_before, "load_after": round(os.getloadavg()[0], 2)},
            "code": code_version(source),
            "faults": [w.as_dict(t0) for w in windows],
            "drain": drain,
            "failures": tally.failures(figures, windows),
            "figures": figures,
        }
        report.write(result, out)
        _keep_log(postgres, out)
        overall = figures["latency"]["overall"]
        log(
            f"{figures['requests']:,} requests, statuses {figures['statuses']}; "
            f"{figures['predictions_answered']:,} predictions answered, {figures['rows_stored']:,} rows: "
            f"missing {figures['missing']}, duplicated "
            f"{figures['duplicated_answered'] + figures['duplicated_stored']}, extra {figures['extra']}; "
            f"answered p99 {overall['p99_ms']} ms (during faults {figures['latency']['during_faults']['p99_ms']} ms)"
        )
        log(f"report: {out / 'report.md'}")
        if result["failures"]:
            log("FAILED:\n  " + "\n  ".join(result["failures"]))
            return 1
        return 0
    finally:
        if locust is not None:
            stop_locust(locust)
        for proc in reversed(started):
            try:
                proc.stop()
            except Exception as exc:  # keep tearing down the rest
                log(f"stopping {type(proc).__name__}: {exc}")


def _keep_log(postgres: PostgresServer, out: Path) -> None:
    """PostgreSQL's log beside the service's: what it saw of the stops and the crash recovery."""
    try:
        shutil.copyfile(postgres.dir / "log", out / "postgres.log")
    except OSError as exc:
        log(f"PostgreSQL's log not kept: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--out", type=Path, default=None, help="default var/chaos/<time>")
    parser.add_argument(
        "--source", type=Path, default=ROOT, help="serve the service of another checkout (an earlier commit, say)"
    )
    args = parser.parse_args(argv)
    out = args.out or ROOT / "var" / "chaos" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    return run(PROFILES[args.profile], out, args.source.resolve())


if __name__ == "__main__":
    raise SystemExit(main())
