"""`make loadtest`: the original deployment's load-test plan, run, with a report per scenario.

    python -m loadtests.run baseline|spike|cache|all|steps [--profile full|quick] [--url URL]
                            [--users N] [--duration 10m] [--out DIR] [--no-thresholds]

The plan is here: `PLAN`, the original's scenarios at full scale, `QUICK` the same mix at a small
scale (for CI), and `STEPS` (not in `all`: it is not the original's) one replica's saturation at
shares of its capacity. `make loadtest SCENARIO=... [URL=...] [USERS=...] [DURATION=...]
[PROFILE=quick]` calls this. Without --url it starts the service itself (`bentoml serve` with its
defaults, the models in the BentoML store) on throwaway Redis and PostgreSQL servers, and a
Prometheus when one is installed; it samples CPU and memory of the API, PostgreSQL, Redis and
Locust every second. Each scenario runs Locust headless (loadtests/locustfile.py's SentimentUser;
the options common to every scenario in loadtests/locust.conf), then loadtests/report/ writes
`<out>/<scenario>/report.md` with tables and plots, judged against the original's figures and
this project's targets; <out> is var/loadtests/<time> unless --out. `steps` also writes
`<out>/steps/steps.md`, the saturation table.

Exit status: 1 when a scenario's errors other than 429 exceed 1% of its requests or its p95
exceeds the scenario's limit (--p95-limit-ms overrides it), unless --no-thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from loadtests.harness import ResourceSampler, log, metric_sum, parse_metrics, read_metrics, start_locust, stopped
from loadtests.report import figures, markdown
from tests.support.serving import ROOT, Served, free_port

# Locust's options common to every scenario; each run's own go on the command line.
LOCUST_CONF = Path(__file__).resolve().with_name("locust.conf")


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"duration {text!r}: expected e.g. 90s, 10m or 1h")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


# --- the plan -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    users: int
    spawn_rate: float
    duration_s: float
    repeat_share: float
    repeat_pool: int = 200
    shape: str = ""  # the locustfile's PlanShape drives users and duration: "spike" or "steps"
    ramp_s: float = 0
    hold_s: float = 0
    step_s: float = 0  # steps: seconds at each share of `users`
    step_shares: tuple[float, ...] = ()
    p95_limit_ms: float = 120.0
    description: str = ""


# The original plan. p95 limits: baseline's target on 2 cores, and the original's own p95 elsewhere.
PLAN = {
    "baseline": Scenario(
        "baseline", 100, 10, 600, 0.72, p95_limit_ms=60, description="100 users, spawn 10/s, 10 minutes"
    ),
    "spike": Scenario(
        "spike",
        500,
        0,
        420,
        0.72,
        shape="spike",
        ramp_s=120,
        hold_s=300,
        p95_limit_ms=140,
        description="0 to 500 users over 2 minutes, 500 held for 5 minutes",
    ),
    "cache": Scenario(
        "cache",
        50,
        10,
        300,
        1.0,
        repeat_pool=100,
        p95_limit_ms=120,
        description="50 users, 5 minutes, only repeated texts",
    ),
}
# About two minutes for all three: the same mix at a small scale, for CI.
QUICK = {
    "baseline": replace(PLAN["baseline"], users=20, spawn_rate=10, duration_s=40, description="quick: 20 users, 40 s"),
    "spike": replace(
        PLAN["spike"], users=60, duration_s=40, ramp_s=15, hold_s=25, description="quick: 0 to 60 users in 15 s, 25 s"
    ),
    "cache": replace(PLAN["cache"], users=10, duration_s=30, repeat_pool=20, description="quick: 10 users, 30 s"),
}

# Beyond the original plan: one replica's saturation at fixed shares of its capacity, for the
# autoscaler's target (docs/scaling.md). 400 users of the original's traffic (about 400
# requests a second, 72% of texts repeated) are 100%: the spike sheds beyond that.
STEPS = Scenario(
    "steps",
    400,
    0,
    6 * 90,
    0.72,
    shape="steps",
    step_s=90,
    # 87.5%: between the last step without sheds and the first with, where the target lies.
    step_shares=(0.25, 0.5, 0.75, 0.875, 1.0, 1.25),
    p95_limit_ms=float("inf"),  # the last step is meant to overload it
    description="25, 50, 75, 87.5, 100 and 125% of 400 users, 90 s each",
)
QUICK_STEPS = replace(STEPS, users=40, duration_s=6 * 20, step_s=20, description="quick: 10 to 50 users, 20 s each")


# --- one scenario -----------------------------------------------------------------------


def run_locust(scenario: Scenario, url: str, out: Path, admin_key: str | None) -> subprocess.Popen[bytes]:
    options = ["--config", str(LOCUST_CONF), "--csv", str(out / "locust"), "--outcomes", str(out / "outcomes.json")]
    options += ["--repeat-share", str(scenario.repeat_share), "--repeat-pool", str(scenario.repeat_pool)]
    if not scenario.shape:
        options += ["-u", str(scenario.users), "-r", str(scenario.spawn_rate), "-t", f"{int(scenario.duration_s)}s"]
    env = {"LOCUST_ADMIN_KEY": admin_key} if admin_key else {}
    if scenario.shape == "spike":
        env |= {
            "LOADTEST_SHAPE": "spike",
            "SPIKE_USERS": str(scenario.users),
            "SPIKE_RAMP_S": str(scenario.ramp_s),
            "SPIKE_HOLD_S": str(scenario.hold_s),
        }
    if scenario.shape == "steps":
        env |= {
            "LOADTEST_SHAPE": "steps",
            "STEP_USERS": str(scenario.users),
            "STEP_S": str(scenario.step_s),
            "STEP_SHARES": ",".join(map(str, scenario.step_shares)),
        }
        options += ["--timeline", str(out / "timeline.csv")]
    return start_locust("SentimentUser", url, options, out / "locust.log", env)


SIGNALS = ("in_flight", "queue_delay")  # sentiment_saturation's, sampled during the steps


def saturation_reader(url: str) -> dict[str, Any]:
    """ResourceSampler columns: each saturation signal, read from the service's /metrics."""
    last: dict[str, Any] = {"at": 0.0, "values": {}}

    def read(signal: str) -> float | None:
        if time.monotonic() - last["at"] > 0.5:  # one /metrics read per sample for both columns
            samples = parse_metrics(read_metrics(url, timeout=2))
            values = {s: metric_sum(samples, "sentiment_saturation", signal=s) for s in SIGNALS}
            last.update(at=time.monotonic(), values=values)
        return last["values"].get(signal)

    return {f"saturation_{s}": (lambda s=s: read(s)) for s in SIGNALS}


def _get(url: str, path: str, **kw: Any) -> httpx.Response | None:
    """An answer of 200, or None: a failing call leaves that part out of the report."""
    try:
        r = httpx.get(f"{url}{path}", timeout=30, **kw)
    except httpx.HTTPError:
        return None
    return r if r.status_code == 200 else None


def _metrics_text(url: str) -> str:
    """/metrics, or nothing: a proxy in front (nginx refuses /metrics from outside) leaves the
    service's own figures out of the report."""
    try:
        return read_metrics(url, timeout=30)
    except httpx.HTTPError:
        return ""


def run_scenario(
    scenario: Scenario,
    url: str,
    out: Path,
    roots: dict[str, int],
    admin_key: str | None,
    redis_url: str | None = None,
    workers: int | None = None,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    (out / "metrics_before.txt").write_text(_metrics_text(url))
    started = time.time()
    locust = run_locust(scenario, url, out, admin_key)
    extras = {}
    if redis_url:
        import redis

        client = redis.Redis.from_url(redis_url, socket_timeout=1)
        extras["redis_used_mb"] = lambda: round(client.info("memory")["used_memory"] / 2**20, 2)
    if scenario.shape == "steps":
        extras |= saturation_reader(url)
    sampler = ResourceSampler({**roots, "locust": locust.pid}, extras=extras).start()
    locust.wait()
    ended = time.time()
    rows = sampler.stop()
    time.sleep(2)  # the analytics writer flushes every 0.5 s
    (out / "metrics_after.txt").write_text(_metrics_text(url))
    window = f"{int(ended - started) + 5}s"
    analytics = _get(url, "/analytics/summary", params={"window": window}, headers=headers)
    run = {
        "scenario": asdict(scenario),
        "url": url,
        "started": started,
        "ended": ended,
        "locust_exit": locust.returncode,
        "analytics_summary": analytics.json() if analytics is not None and analytics.status_code == 200 else None,
        "health": (h.json() if (h := _get(url, "/health")) is not None else None),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "workers": workers,
        },
        "sampled": sorted(roots) + ["locust"],
    }
    (out / "run.json").write_text(json.dumps(run, indent=2))
    figures.write_csv(out / "resources.csv", rows)
    return run


# --- the whole run ----------------------------------------------------------------------


def redis_flush(redis_url: str) -> None:
    """An empty cache and fresh limits."""
    import redis

    redis.Redis.from_url(redis_url).flushdb()


def start_stack(
    out: Path, workers: int | None, started: list, env: dict[str, str] | None = None
) -> tuple[Served, dict[str, int], str]:
    """Throwaway Redis and PostgreSQL and the service on them (`bentoml serve`, the store's
    models, `env` on top): the service, the pids to sample, and Redis's URL. Each server is
    appended to `started` before its start, so the caller stops a failed start's servers too."""
    from tests.support.servers import serve_on_backends

    log("starting Redis, PostgreSQL and the service (bentoml serve) ...")
    served, redis_server, postgres = serve_on_backends(
        out, started, {"TRUSTED_PROXIES": "127.0.0.1", **(env or {})}, workers
    )
    assert served.proc is not None and redis_server.proc is not None
    roots = {"api": served.proc.pid, "postgresql": postgres.pid(), "redis": redis_server.proc.pid}
    return served, roots, redis_server.url


def start_embedded(out: Path, workers: int | None, started: list, analytics_rows: int) -> tuple[Served, dict[str, int]]:
    """The service on its embedded defaults (no Redis, no PostgreSQL: the instance's own cache and
    limiter, SQLite analytics in `out`), the SQLite file first seeded with `analytics_rows`
    predictions over 30 days when asked: the service and the pids to sample."""
    url = f"sqlite:///{out / 'analytics.db'}"
    if analytics_rows:
        from loadtests.analytics import seed

        log(f"seeding {analytics_rows:,} predictions into {url} ...")
        seed(url, analytics_rows, 30)
    log("starting the service on its embedded defaults (bentoml serve) ...")
    env = {"DATABASE_URL": url, "SPILL_DIR": str(out / "spill"), "TRUSTED_PROXIES": "127.0.0.1"}
    served = Served({**env, "REDIS_URL": ""}, out / "serve.log", workers=workers)
    started.append(served)
    served.start(timeout=300)
    assert served.proc is not None
    return served, {"api": served.proc.pid}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=[*PLAN, "all", "steps"])
    parser.add_argument("--profile", choices=["full", "quick"], default="full")
    parser.add_argument("--url", default=os.environ.get("LOADTEST_URL") or None, help="test this service")
    parser.add_argument("--users", type=int, default=None, help="users (peak users for the spike)")
    parser.add_argument("--duration", type=parse_duration, default=None, help="e.g. 90s, 10m (not the spike)")
    parser.add_argument("--p95-limit-ms", type=float, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default var/loadtests/<time>")
    parser.add_argument("--no-thresholds", action="store_true", help="report only; exit 0 whatever the figures")
    parser.add_argument(
        "--workers", type=int, default=None, help="SERVICE_WORKERS of the service it starts (default: its own)"
    )
    parser.add_argument(
        "--embedded", action="store_true", help="start the service without Redis and PostgreSQL (its embedded defaults)"
    )
    parser.add_argument(
        "--analytics-rows", type=int, default=0, help="with --embedded: predictions seeded into its SQLite first"
    )
    args = parser.parse_args(argv)

    plan = {**(QUICK if args.profile == "quick" else PLAN), "steps": QUICK_STEPS if args.profile == "quick" else STEPS}
    names = list(PLAN) if args.scenario == "all" else [args.scenario]
    out = args.out or ROOT / "var" / "loadtests" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    admin_key = os.environ.get("ADMIN_API_KEY")

    from service.config import Settings
    from tests.support.prometheus import Prometheus

    roots: dict[str, int] = {}
    url = args.url
    redis_url = None
    prometheus = None
    with stopped() as started:
        if url is None and args.embedded:
            served, roots = start_embedded(out, args.workers, started, args.analytics_rows)
            url = served.url
        elif url is None:
            served, roots, redis_url = start_stack(out, args.workers, started)
            url = served.url
            try:
                prometheus = Prometheus([f"127.0.0.1:{served.port}"], out / "prometheus", free_port(), "5s")
                started.append(prometheus)
                prometheus.start()
            except RuntimeError as exc:
                log(f"no Prometheus for the dashboard plot: {exc}")
        failed: list[str] = []
        for name in names:
            scenario = plan[name]
            if args.users:
                scenario = replace(scenario, users=args.users)
            if args.duration and not scenario.shape:
                scenario = replace(scenario, duration_s=args.duration)
            if args.p95_limit_ms is not None:
                scenario = replace(scenario, p95_limit_ms=args.p95_limit_ms)
            if redis_url:
                redis_flush(redis_url)  # each scenario starts with a cold cache and fresh limits
            log(f"[{name}] {scenario.description} against {url}")
            workers = (args.workers or Settings().service_workers) if roots else None
            run_scenario(scenario, url, out / name, roots, admin_key, redis_url, workers)
            result = markdown.build(out / name, prometheus_url=prometheus.url if prometheus else None)
            log(markdown.console_summary(result))
            if scenario.shape == "steps":
                rows = figures.steps_table(out / name, scenario.users, scenario.step_s, list(scenario.step_shares))
                log(markdown.write_steps(out / name, rows))
            failed += [f"{name}: {v}" for v in result["violations"]]
        log(f"reports: {out}/<scenario>/report.md")
        if failed and not args.no_thresholds:
            log("thresholds not met:\n  " + "\n  ".join(failed))
            return 1
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
