"""docs/monitoring.md against what it describes: every metric the service defines is in its
table and nothing else is, every alert rule is named, and the dashboard's panel count is right."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import yaml
from prometheus_client.metrics import MetricWrapperBase

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "monitoring.md").read_text()
# The modules that define the service's metrics (prometheus_client objects at module level).
METRIC_MODULES = ("service.metrics", "storage.cache", "storage.ratelimit", "storage.analytics.writer")


def _defined_series() -> set[str]:
    names = set()
    for module in map(importlib.import_module, METRIC_MODULES):
        for value in vars(module).values():
            if isinstance(value, MetricWrapperBase):
                for family in value.describe():
                    names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def _documented_series() -> set[str]:
    return set(re.findall(r"^\| `(sentiment_[a-z_]+)` \|", DOC, flags=re.MULTILINE))


def test_the_metrics_table_lists_exactly_the_defined_series() -> None:
    defined = _defined_series()
    assert len(defined) > 20
    documented = _documented_series()
    assert not defined - documented, f"defined but not in docs/monitoring.md: {sorted(defined - documented)}"
    assert not documented - defined, f"in docs/monitoring.md but not defined: {sorted(documented - defined)}"


def test_every_alert_rule_is_named_in_the_docs() -> None:
    rules = yaml.safe_load((ROOT / "prometheus" / "alerts.yml").read_text())
    alerts = [r["alert"] for group in rules["groups"] for r in group["rules"] if "alert" in r]
    assert len(alerts) >= 10
    missing = [a for a in alerts if f"`{a}`" not in DOC]
    assert not missing, f"alerts not named in docs/monitoring.md: {missing}"


def test_the_dashboard_panel_count_is_the_docs_count() -> None:
    panels = json.loads((ROOT / "grafana" / "dashboards" / "sentiment.json").read_text())["panels"]
    rows = sum(1 for p in panels if p.get("type") == "row")
    said = re.search(r"has (\d+) panels in (\d+) rows", DOC)
    assert said, "docs/monitoring.md does not say how many panels the dashboard has"
    assert (int(said[1]), int(said[2])) == (len(panels) - rows, rows)
