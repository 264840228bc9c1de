"""Faults under load: is every answered prediction stored, once, whatever breaks?

    python -m loadtests.chaos [--profile full|quick] [--out DIR] [--source CHECKOUT]

`make chaos [PROFILE=quick]` calls this. It starts throwaway Redis and PostgreSQL servers and a
2-worker `bentoml serve` on them (rate limits off, a SPILL_DIR of its own, the models of the
BentoML store in $BENTOML_HOME or ~/bentoml), runs Locust headless (loadtests/locustfile.py's
ChaosUser) for the whole run and, meanwhile, the profile's faults (`PROFILES`; faults.py holds
what each does): Redis hung, Redis killed, PostgreSQL stopped at once, PostgreSQL black-holed, a
worker killed, the service restarted. After the load it waits for the analytics writer to drain, stops the service with
SIGTERM and compares the request ids of every answer with the `predictions` table.

The report (report.md, report.json, timeline.png) goes to <out>, var/chaos/<time> unless --out.
Exit status 1 when an answered prediction has no row, an id was answered or stored twice, a
5xx other than a shed (503 with Retry-After) was answered, or a fault could not be injected.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from loadtests.chaos import faults
from loadtests.chaos.faults import (
    DESCRIPTIONS,
    POSTGRES_BLACKHOLE,
    POSTGRES_STOP,
    REDIS_HANG,
    REDIS_KILL,
    SERVICE_RESTART,
    WORKER_KILL,
    Fault,
)
from loadtests.harness import log, start_locust, stop_locust, stopped
from loadtests.report.markdown import table
from loadtests.report.plots import chaos_timeline
from tests.support.servers import PostgresServer, serve_on_backends
from tests.support.serving import ROOT

WORKERS = 2


# --- the profiles: how many users, how long, and the faults' timeline ------------------------


@dataclass(frozen=True)
class Profile:
    name: str
    users: int
    spawn_rate: float
    duration_s: float  # the load's planned length
    tail_s: float  # load kept going at least this long after the last fault ended
    faults: tuple[Fault, ...]
    drain_timeout_s: float = 120  # waiting for the analytics rows after the load


FULL = Profile(
    "full",
    users=80,
    spawn_rate=20,
    duration_s=180,
    tail_s=15,
    faults=(
        Fault(REDIS_HANG, 15, 15),
        Fault(REDIS_KILL, 40, 5),
        Fault(POSTGRES_STOP, 55, 25),
        Fault(POSTGRES_BLACKHOLE, 90, 20),
        Fault(WORKER_KILL, 120),
        Fault(SERVICE_RESTART, 140),
    ),
)

QUICK = Profile(
    "quick",
    users=10,
    spawn_rate=10,
    duration_s=60,
    tail_s=5,
    faults=(
        Fault(REDIS_HANG, 5, 5),
        Fault(REDIS_KILL, 13, 2),
        Fault(POSTGRES_STOP, 18, 8),
        Fault(POSTGRES_BLACKHOLE, 29, 6),
        Fault(WORKER_KILL, 38),
        Fault(SERVICE_RESTART, 44),
    ),
    drain_timeout_s=60,
)

PROFILES = {p.name: p for p in (FULL, QUICK)}


class Load:
    """The run's Locust, stopped with the servers: SIGTERM first, so its users finish their requests."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def stop(self) -> None:
        stop_locust(self.proc)


def start_load(profile: Profile, url: str, out: Path) -> subprocess.Popen[bytes]:
    """Locust headless with no run time: it runs until SIGTERMed, which ends it cleanly."""
    options = ["--headless", "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0"]
    # users finish the request they are in; a cut one would look unanswered
    options += ["--stop-timeout", "30", "-u", str(profile.users), "-r", str(profile.spawn_rate)]
    return start_locust("ChaosUser", url, [*options, "--records", str(out / "records-0.jsonl")], out / "locust.log")


def code_version(source: Path) -> dict[str, Any]:
    """The commit the service ran from, and its files under service/ and storage/ that differ."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else ""

    # porcelain lines are "XY path": the status columns may be blank, so nothing is stripped first
    changed = git("status", "--porcelain", "--", "service", "storage").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "uncommitted": [line[3:] for line in changed]}


def run(profile: Profile, out: Path, source: Path = ROOT) -> int:
    with stopped() as started:
        log(f"starting Redis, PostgreSQL and bentoml serve ({WORKERS} workers) ...")
        # each one's stop registered before its start: a failed start is stopped too
        limits_off = {"RATE_LIMIT_PREDICT": "0", "RATE_LIMIT_BATCH": "0"}
        served, redis_server, postgres = serve_on_backends(out, started, limits_off, WORKERS, source)
        stack = faults.Stack(redis_server, postgres, served)

        log(f"load: {profile.users} users against {served.url}, faults on a timeline")
        load_before = round(os.getloadavg()[0], 2)
        t0 = time.time()
        started_utc = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        locust = start_load(profile, served.url, out)
        started.append(Load(locust))
        windows = faults.run_timeline(profile.faults, stack, t0, log)
        end = max(t0 + profile.duration_s, (windows[-1].end if windows else t0) + profile.tail_s)
        time.sleep(max(0.0, end - time.time()))
        stop_locust(locust)
        load_s = time.time() - t0
        log(f"[{load_s:6.1f} s] load stopped; waiting for the analytics writer to drain")

        engine = sa.create_engine(postgres.url)
        drain = faults.wait_drained(engine, served.url, profile.drain_timeout_s, log=log)
        served.stop()  # SIGTERM: the shutdown hooks write (or spill) whatever is left
        stored = faults.stored_ids(engine)
        engine.dispose()
        figures = faults.tally(faults.read_records(out), stored, windows, t0)
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
            "failures": failures(figures, windows),
            "figures": figures,
        }
        write_report(result, out)
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


def failures(figures: dict[str, Any], windows: list[faults.Window]) -> list[str]:
    """Why the run failed: the conditions `make chaos` exits non-zero on."""
    found = []
    if figures["missing"]:
        found.append(f"{figures['missing']} answered predictions have no analytics row")
    duplicated = figures["duplicated_answered"] + figures["duplicated_stored"]
    if duplicated:
        found.append(f"{duplicated} request ids answered or stored twice")
    if figures["server_errors"]:
        found.append(f"5xx other than a shed: {figures['server_errors']}")
    if figures["answers_without_ids"]:
        found.append(f"{figures['answers_without_ids']} answers (200) without request ids")
    found += [f"fault {w.name} failed: {w.error}" for w in windows if w.error]
    return found


def _keep_log(postgres: PostgresServer, out: Path) -> None:
    """PostgreSQL's log beside the service's: what it saw of the stops and the crash recovery."""
    try:
        shutil.copyfile(postgres.dir / "log", out / "postgres.log")
    except OSError as exc:
        log(f"PostgreSQL's log not kept: {exc}")


# --- the report ------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} ms"


def markdown(run: dict[str, Any]) -> str:
    f, p = run["figures"], run["profile"]
    lat = f["latency"]
    code = run.get("code") or {"commit": "", "uncommitted": []}
    machine = run.get("machine") or {}
    verdict = "**passed**" if not run["failures"] else "**failed**: " + "; ".join(run["failures"])
    lines = [
        f"# Chaos run: {p['name']} profile",
        "",
        f"Started {run['started_utc']}; {p['users']} Locust users for {run['load_s']:.0f} s "
        f"(70% /predict, 20% /predict/ab, 10% /batch), `bentoml serve` with {run['workers']} workers on "
        "throwaway Redis and PostgreSQL, rate limits off. Verdict: " + verdict + ".",
        "",
        f"The service ran from commit {code['commit'] or '?'}"
        + (f" with uncommitted changes to {', '.join(code['uncommitted'])}" if code["uncommitted"] else "")
        + f". Load average (1 min) of the {machine.get('cpus')} cores: {machine.get('load_before', '?')} before "
        f"the load, {machine.get('load_after', '?')} after it.",
        "",
        "## Faults",
        "",
    ]
    rows: list[tuple[Any, ...]] = []
    for w in run["faults"]:
        during = lat["by_fault"].get(w["name"], {})
        outcomes = during.get("outcomes", {})
        other = sum(n for k, n in outcomes.items() if k not in ("200", "503 shed"))
        what = f"{DESCRIPTIONS[w['name']]}: {w['error'] or w['detail']}"
        rows.append((w["name"], what, f"{w['start_s']:.1f} s", f"{w['end_s']:.1f} s", _ms(during.get("p99_ms"))))
        rows[-1] += (during.get("requests", 0), during.get("answered", 0), outcomes.get("503 shed", 0), other)
    lines += table(("fault", "what", "from", "to", "answered p99", "requests", "answered", "shed", "other"), rows)
    drain = run["drain"]
    drained = f"{drain['rows']:,} rows after {drain['seconds']} s"
    drained += f" ({'steady' if drain['drained'] else 'not drained: timed out'})"
    stored = [
        ("predictions answered (ids in 200 bodies)", f"{f['predictions_answered']:,}"),
        ("rows in `predictions`", f"{f['rows_stored']:,}"),
        ("**missing** (answered, no row; must be 0)", f"{f['missing']:,}"),
        (
            "**duplicated** (an id answered or stored twice; must be 0)",
            f"{f['duplicated_answered'] + f['duplicated_stored']:,}",
        ),
        ("extra (a row never answered: in flight when a worker died or a connection broke)", f"{f['extra']:,}"),
        ("analytics drained after the load", drained),
    ]
    lines += ["", "## Every answer stored once?", "", *table(("figure", "value"), stored)]
    if f["missing"]:
        by = ", ".join(f"{k}: {n}" for k, n in f["missing_by_window"].items())
        lines += ["", f"Missing rows by the fault on when (or within 2 s after) they were answered: {by}."]
    lines += [
        "",
        "## Statuses",
        "",
        *table(("outcome", "requests"), ((k, f"{n:,}") for k, n in f["statuses"].items())),
        "",
        "Connection errors by type: "
        + (", ".join(f"{k} {n}" for k, n in f["connection_errors"].items()) or "none")
        + ". 5xx other than a shed: "
        + (", ".join(f"{k}: {n}" for k, n in f["server_errors"].items()) or "none")
        + ".",
        "",
        "## Latency of answered requests",
        "",
    ]
    spans = (("overall", "overall"), ("during faults", "during_faults"), ("outside", "outside_faults"))
    rows = [
        (name, f"{x['requests']:,}", f"{x['answered']:,}", _ms(x["p50_ms"]), _ms(x["p99_ms"]), _ms(x["max_ms"]))
        for name, x in ((name, lat[key]) for name, key in spans)
    ]
    lines += table(("requests sent", "requests", "answered", "p50", "p99", "slowest"), rows)
    lines += ["", "![timeline](timeline.png)", ""]
    return "\n".join(lines)


def write_report(run: dict[str, Any], out: Path) -> None:
    """report.json (everything), report.md (the tables), timeline.png."""
    (out / "report.json").write_text(json.dumps(run, indent=2))
    chaos_timeline(run, out / "timeline.png")
    (out / "report.md").write_text(markdown(run))


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
