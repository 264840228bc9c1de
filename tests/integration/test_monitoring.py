"""Alert rules, dashboards and metrics against a real Prometheus scraping a real `bentoml serve`."""

from __future__ import annotations

import concurrent.futures as cf
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from loadtests.report.plots import plot_dashboard
from tests.support.prometheus import (
    PROMETHEUS_DIR,
    Prometheus,
    alert_measures,
    alert_rules,
    dashboard_queries,
    metric_names,
)
from tests.support.servers import PostgresServer, RedisServer
from tests.support.serving import ROOT, Served, free_port

pytestmark = pytest.mark.integration


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: install the Debian package prometheus (.ci/run does)"
    return subprocess.run([promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args",
    [("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml"), ("test", "rules", "alerts_test.yml")],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool(args: tuple[str, ...]) -> None:
    result = _promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_has_firing_and_quiet_cases() -> None:
    cases = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    expectations = [(t["alertname"], bool(t["exp_alerts"])) for case in cases for t in case["alert_rule_test"]]
    for rule in alert_rules():
        assert (rule["alert"], True) in expectations, f"{rule['alert']} is never expected to fire"
        assert (rule["alert"], False) in expectations, f"{rule['alert']} is never expected to stay quiet"


@pytest.fixture(scope="module")
def monitored(
    model_env: dict[str, str],
    bentoml_home: Path,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Served, Prometheus]]:
    """Two workers on Redis and PostgreSQL, low rate limits (so 429s happen), and a Prometheus
    scraping them every second with the committed rules."""
    workdir = tmp_path_factory.mktemp("monitoring")
    env = {
        "BENTOML_HOME": str(bentoml_home),
        **model_env,
        "REDIS_URL": redis_server.url,
        "DATABASE_URL": postgres_server.url,
        "SPILL_DIR": str(workdir / "spill"),
        "RATE_LIMIT_PREDICT": "40/minute",
        "RATE_LIMIT_BATCH": "5/minute",
        "TRUSTED_PROXIES": "127.0.0.1",
    }
    with (
        Served(env, workdir / "serve.log") as served,
        Prometheus([f"127.0.0.1:{served.port}"], workdir / "prometheus", free_port(), labels=POD_LABELS) as prometheus,
    ):
        yield served, prometheus


# The labels Kubernetes' service discovery puts on a pod's series, as the autoscaler's adapter
# expects them (deploy/k8s/autoscaling/prometheus-adapter-values.yaml).
POD_LABELS = {"namespace": "sentiment", "pod": "sentiment-7d9f8c-abcde"}
ADAPTER_VALUES = ROOT / "deploy" / "k8s" / "autoscaling" / "prometheus-adapter-values.yaml"


def _load(url: str, seconds: float) -> dict[int, int]:
    """A short mixed load from a few clients: unique and repeated texts, A/B, batches, feedback,
    analytics, health, bad requests and enough requests from one client to be rate limited."""
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + seconds
    run = uuid.uuid4().hex[:6]

    def client(n: int) -> None:
        with httpx.Client(base_url=url, timeout=60, headers={"X-Forwarded-For": f"198.51.100.{n}"}) as http:
            i = 0
            while time.monotonic() < deadline:
                i += 1
                text = f"The service was {'great' if i % 2 else 'awful'} {run} {i % 7 if n % 2 else i}"
                responses = [
                    http.post("/predict", json={"text": text}),
                    http.post("/predict/ab", json={"text": text, "user_id": f"user-{n}-{i}"}),
                ]
                if i % 3 == 0:
                    responses.append(http.post("/batch", json={"texts": [text, f"{text}!", "Fine."]}))
                if i % 5 == 0:
                    responses.append(http.post("/predict", json={"text": ""}))  # 400
                    responses.append(http.get("/health"))
                    responses.append(http.get("/analytics/summary", params={"window": "5m"}))
                    rid = responses[0].json().get("request_id") if responses[0].status_code == 200 else None
                    if rid:
                        responses.append(http.post("/feedback", json={"request_id": rid, "label": "positive"}))
                for r in responses:
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    with cf.ThreadPoolExecutor(4) as pool:
        list(pool.map(client, range(4)))
    return statuses


def test_dashboards_and_alerts_have_data_from_a_live_service(
    monitored: tuple[Served, Prometheus], tmp_path: Path
) -> None:
    served, prometheus = monitored
    started = time.time()
    statuses = _load(served.url, 20)
    assert statuses.get(200, 0) > 50 and statuses.get(429, 0) > 0 and statuses.get(400, 0) > 0, statuses
    assert not any(s >= 500 for s in statuses), statuses
    time.sleep(8)  # a few more scrapes and the workers' gauge refresh (every 5 s)

    # every target up, every rule loaded and healthy
    targets = httpx.get(f"{prometheus.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"]
    groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {r["name"]: r["health"] for g in groups for r in g["rules"]}
    assert loaded == {rule["alert"]: "ok" for rule in alert_rules()}

    # no panel or alert reads a metric the service does not expose
    exposed = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", httpx.get(f"{served.url}/metrics").text, re.M))
    exposed.add("up")  # Prometheus' own, per target
    queries = dashboard_queries() + alert_measures()
    assert len(dashboard_queries()) >= 20
    for q in queries:
        missing = metric_names(q.expr) - exposed
        assert not missing, f"{q.source}: {missing} not exposed by the service"

    # every query returns data
    empty = [f"{q.source}: {q.expr}" for q in queries if not prometheus.query(q.expr)]
    assert not empty, "queries without data:\n" + "\n".join(empty)

    # the figures agree with the load: requests counted, 429s seen, the cache hit, both variants
    assert prometheus.query('sum(sentiment_rate_limited_requests_total{endpoint="/predict"})')[0]["value"][1] != "0"
    variants = {s["metric"]["variant"] for s in prometheus.query("sum by (variant) (sentiment_predictions_total)")}
    assert {"A", "B", "none"} <= variants
    hit_rate = float(
        prometheus.query('sum(sentiment_cache_lookups_total{result="hit"}) / sum(sentiment_cache_lookups_total)')[0][
            "value"
        ][1]
    )
    assert 0.1 < hit_rate < 1.0
    deps = {
        (s["metric"]["dependency"], s["metric"]["backend"]): s["value"][1]
        for s in prometheus.query("sentiment_dependency_up")
    }
    assert deps == {("cache", "redis"): "1", ("database", "postgresql"): "1"}

    # the README's plot renders from the same queries
    png = plot_dashboard(prometheus.url, started - 5, time.time(), tmp_path / "dashboard.png", step=1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_the_autoscalers_metric_comes_from_the_adapters_queries(monitored: tuple[Served, Prometheus]) -> None:
    """The adapter's rule, rendered as the adapter renders it for the HPA's pods, finds the
    pod's series and gives one value for it, between 0 and 1, and above 0 under load."""
    served, prometheus = monitored
    [rule] = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    # The adapter's rule fields (its docs/config.md): nothing else is read.
    assert set(rule) <= {"seriesQuery", "seriesFilters", "resources", "name", "metricsQuery"}, sorted(rule)
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    hpa = yaml.safe_load((ROOT / "deploy" / "k8s" / "hpa.yaml").read_text())
    [pods] = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert (
        re.fullmatch(rule["name"]["matches"], "sentiment_saturation") and rule["name"]["as"] == pods["metric"]["name"]
    )
    _load(served.url, 8)
    time.sleep(3)  # a gauge round and a scrape
    found = httpx.get(f"{prometheus.url}/api/v1/series", params={"match[]": rule["seriesQuery"]}, timeout=10)
    signals = {s["signal"] for s in found.json()["data"] if {k: s[k] for k in POD_LABELS} == POD_LABELS}
    assert signals == {"in_flight", "queue_delay"}, found.json()
    matchers = f'namespace="{POD_LABELS["namespace"]}",pod=~"{POD_LABELS["pod"]}"'
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", "sentiment_saturation")
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", "pod")
    )
    [sample] = prometheus.query(query)
    assert sample["metric"] == {"pod": POD_LABELS["pod"]}, sample
    assert 0 < float(sample["value"][1]) <= 1, sample
