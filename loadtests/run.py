"""Run the original deployment's load-test plan (loadtests/plan.py) and write a report per scenario.

    python -m loadtests.run baseline|spike|cache|all|steps [--profile full|quick] [--url URL]
                            [--users N] [--duration 10m] [--out DIR] [--no-thresholds]

`make loadtest SCENARIO=... [URL=...] [USERS=...] [DURATION=...] [PROFILE=quick]` calls this.
Without --url it starts the service itself (`bentoml serve` with its defaults, the models in the
BentoML store) on throwaway Redis and PostgreSQL servers, and a Prometheus when one is
installed; it samples CPU and memory of the API, PostgreSQL, Redis and Locust every second.
Each scenario runs Locust headless (loadtests/locustfile.py; the options common to every
scenario in loadtests/locust.conf), then loadtests/report.py writes `<out>/<scenario>/report.md`
with tables and plots; <out> is var/loadtests/<time> unless --out. `steps` (not in `all`: it is
not the original's) also writes `<out>/steps/steps.md`, the saturation table (loadtests/steps.py).

Exit status: 1 when a scenario's errors other than 429 exceed 1% of its requests or its p95
exceeds the scenario's limit (--p95-limit-ms overrides it), unless --no-thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil

from loadtests import report, steps
from loadtests.figures import write_csv
from loadtests.plan import PLAN, QUICK, QUICK_STEPS, STEPS, Scenario
from tests.support.serving import ROOT, Served, free_port

# Locust's options common to every scenario; each run's own go on the command line.
LOCUST_CONF = Path(__file__).resolve().with_name("locust.conf")


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"duration {text!r}: expected e.g. 90s, 10m or 1h")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


# --- resources --------------------------------------------------------------------------


@dataclass
class ResourceSampler:
    """CPU (cores in use) and memory (PSS, so shared pages count once) of process groups,
    each given by its root pid, sampled every `interval` seconds in a thread."""

    roots: dict[str, int]
    interval: float = 1.0
    extras: dict[str, Callable[[], float]] = field(default_factory=dict)  # more columns, e.g. Redis memory
    rows: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._last: dict[int, float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _group(self, root: int) -> list[psutil.Process]:
        try:
            proc = psutil.Process(root)
            return [proc, *proc.children(recursive=True)]
        except psutil.Error:
            return []

    def _sample(self, previous: float) -> float:
        now = time.monotonic()
        row: dict = {"t": time.time()}
        for name, root in self.roots.items():
            cpu = mem = 0.0
            for proc in self._group(root):
                try:
                    times = proc.cpu_times()
                    total = times.user + times.system
                    if proc.pid in self._last and now > previous:
                        cpu += (total - self._last[proc.pid]) / (now - previous)
                    self._last[proc.pid] = total
                    mem += proc.memory_full_info().pss
                except psutil.Error:
                    continue
            row[f"{name}_cores"] = round(cpu, 3)
            row[f"{name}_mb"] = round(mem / 2**20, 1)
        for name, read in self.extras.items():
            try:
                row[name] = read()
            except Exception:
                row[name] = None
        self.rows.append(row)
        return now

    def _run(self) -> None:
        previous = self._sample(time.monotonic())
        while not self._stop.wait(self.interval):
            previous = self._sample(previous)

    def start(self) -> ResourceSampler:
        self._thread.start()
        return self

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.rows


# --- one scenario -----------------------------------------------------------------------


def run_locust(scenario: Scenario, url: str, out: Path, admin_key: str | None) -> subprocess.Popen[bytes]:
    shape_file = {"spike": ",loadtests/shapes.py", "steps": ",loadtests/step_shape.py"}.get(scenario.shape, "")
    files = "loadtests/locustfile.py" + shape_file
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "--config",
        str(LOCUST_CONF),
        "-f",
        files,
        "--host",
        url,
        "--csv",
        str(out / "locust"),
        "--repeat-share",
        str(scenario.repeat_share),
        "--repeat-pool",
        str(scenario.repeat_pool),
        "--outcomes",
        str(out / "outcomes.json"),
    ]
    if not scenario.shape:
        cmd += ["-u", str(scenario.users), "-r", str(scenario.spawn_rate), "-t", f"{int(scenario.duration_s)}s"]
    env = {**os.environ, **({"LOCUST_ADMIN_KEY": admin_key} if admin_key else {})}
    if scenario.shape == "spike":
        env |= {
            "SPIKE_USERS": str(scenario.users),
            "SPIKE_RAMP_S": str(scenario.ramp_s),
            "SPIKE_HOLD_S": str(scenario.hold_s),
        }
    if scenario.shape == "steps":
        env |= {
            "STEP_USERS": str(scenario.users),
            "STEP_S": str(scenario.step_s),
            "STEP_SHARES": ",".join(map(str, scenario.step_shares)),
        }
        cmd += ["--timeline", str(out / "timeline.csv")]
    log = (out / "locust.log").open("wb")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _get(url: str, path: str, **kw) -> httpx.Response | None:
    """An answer of 200, or None: a proxy in front (nginx refuses /metrics from outside) or a
    failing call leaves that part out of the report."""
    try:
        r = httpx.get(f"{url}{path}", timeout=30, **kw)
    except httpx.HTTPError:
        return None
    return r if r.status_code == 200 else None


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
    metrics_before = _get(url, "/metrics")
    (out / "metrics_before.txt").write_text(metrics_before.text if metrics_before else "")
    started = time.time()
    locust = run_locust(scenario, url, out, admin_key)
    extras = {}
    if redis_url:
        import redis

        client = redis.Redis.from_url(redis_url, socket_timeout=1)
        extras["redis_used_mb"] = lambda: round(client.info("memory")["used_memory"] / 2**20, 2)
    if scenario.shape == "steps":
        extras |= steps.saturation_reader(url)
    sampler = ResourceSampler({**roots, "locust": locust.pid}, extras=extras).start()
    locust.wait()
    ended = time.time()
    rows = sampler.stop()
    time.sleep(2)  # the analytics writer flushes every 0.5 s
    metrics_after = _get(url, "/metrics")
    (out / "metrics_after.txt").write_text(metrics_after.text if metrics_after else "")
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
    write_csv(out / "resources.csv", rows)
    return run


# --- the whole run ----------------------------------------------------------------------


def _redis_flush(redis_url: str) -> None:
    import redis

    redis.Redis.from_url(redis_url).flushdb()


def start_stack(
    out: Path, workers: int | None, started: list, env: dict[str, str] | None = None
) -> tuple[Served, dict[str, int], str]:
    """Throwaway Redis and PostgreSQL and the service on them (`bentoml serve`, the store's
    models, `env` on top): the service, the pids to sample, and Redis's URL. Each server is
    appended to `started` before its start, so the caller stops a failed start's servers too."""
    from tests.support.servers import serve_on_backends

    print("starting Redis, PostgreSQL and the service (bentoml serve) ...", flush=True)
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
        from loadtests.analytics_bench import seed

        print(f"seeding {analytics_rows:,} predictions into {url} ...", flush=True)
        seed(url, analytics_rows, 30)
    print("starting the service on its embedded defaults (bentoml serve) ...", flush=True)
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

    started: list = []
    roots: dict[str, int] = {}
    url = args.url
    redis_url = None
    prometheus = None
    try:
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
                print(f"no Prometheus for the dashboard plot: {exc}", flush=True)
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
                _redis_flush(redis_url)  # each scenario starts with a cold cache and fresh limits
            print(f"[{name}] {scenario.description} against {url}", flush=True)
            workers = (args.workers or Settings().service_workers) if roots else None
            run_scenario(scenario, url, out / name, roots, admin_key, redis_url, workers)
            result = report.build(out / name, prometheus_url=prometheus.url if prometheus else None)
            print(report.console_summary(result), flush=True)
            if scenario.shape == "steps":
                rows = steps.table(out / name, scenario.users, scenario.step_s, list(scenario.step_shares))
                print(steps.write(out / name, rows), flush=True)
            failed += [f"{name}: {v}" for v in result["violations"]]
        print(f"reports: {out}/<scenario>/report.md", flush=True)
        if failed and not args.no_thresholds:
            print("thresholds not met:\n  " + "\n  ".join(failed), flush=True)
            return 1
        return 0
    finally:
        for proc in reversed(started):
            try:
                proc.stop()
            except Exception as exc:  # keep tearing down the rest
                print(f"stopping {type(proc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
