"""A real Prometheus beside a served instance, and the dashboard's and alerts' queries.

The queries come from the committed files (grafana/dashboards/*.json, prometheus/alerts.yml),
so the tests and the plot evaluate exactly what operators see.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from tests.support.serving import Managed, wait_ready

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "prometheus"
DASHBOARDS = ROOT / "grafana" / "dashboards"
# "<measure> <comparison> <threshold>" as every rule in alerts.yml is written.
THRESHOLD = re.compile(r"^(?P<measure>.*\S)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<value>[0-9.eE+-]+)\s*$", re.S)


@dataclass(frozen=True)
class Query:
    source: str  # panel title or alert name
    expr: str
    legend: str = ""
    unit: str = ""


def dashboard_queries() -> list[Query]:
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
                out.append(Query(panel["title"], target["expr"], target.get("legendFormat", ""), unit))
    return out


def alert_rules() -> list[dict]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


def alert_measures() -> list[Query]:
    """Each alert's expression without its threshold: what it compares, which has data when the
    service is scraped even though the alert itself is quiet."""
    out = []
    for rule in alert_rules():
        match = THRESHOLD.match(rule["expr"].strip())
        if not match:
            raise ValueError(f"alert {rule['alert']}: expected '<measure> <op> <number>', got {rule['expr']!r}")
        out.append(Query(rule["alert"], match["measure"]))
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (identifiers followed by a selector or a range)."""
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=\{|\[)", expr))
    return {n for n in names if n not in {"by", "without", "on", "ignoring"}}


class PrometheusClient:
    """Prometheus' HTTP query API."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        if body.get("status") != "success":
            raise ValueError(f"{expr}: {body.get('error', r.text)}")
        return body["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        params: dict[str, str | float] = {"query": expr, "start": start, "end": end, "step": step}
        body = httpx.get(f"{self.url}/api/v1/query_range", params=params, timeout=60).json()
        if body.get("status") != "success":
            raise ValueError(f"{expr}: {body.get('error')}")
        return body["data"]["result"]


class Prometheus(PrometheusClient, Managed):
    """A Prometheus server from the local binary, scraping `targets` with the committed rules."""

    def __init__(
        self,
        targets: list[str],
        workdir: Path,
        port: int,
        scrape_interval: str = "1s",
        labels: dict[str, str] | None = None,
    ) -> None:
        """`labels` on every scraped series (say `namespace` and `pod`, as Kubernetes' service
        discovery gives them)."""
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus not found: install the Debian package `prometheus` (.ci/run does)")
        self.binary = binary
        self.workdir = workdir
        super().__init__(f"http://127.0.0.1:{port}")
        self.port = port
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        config["global"]["scrape_interval"] = scrape_interval
        config["global"]["evaluation_interval"] = scrape_interval
        config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
        job = config["scrape_configs"][0]
        job.pop("file_sd_configs", None)  # the stacks' targets files; here the given targets
        job["static_configs"] = [{"targets": targets, **({"labels": labels} if labels else {})}]
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> Prometheus:
        cmd = [
            self.binary,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        with (self.workdir / "prometheus.log").open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_ready(f"{self.url}/-/ready", "prometheus", timeout, self.proc, self.tail)
        return self

    def tail(self, n: int = 2000) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None
