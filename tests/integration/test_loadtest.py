"""`make loadtest PROFILE=quick`: all three scenarios against a real service, reports written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.serving import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_quick_profile_runs_every_scenario_and_writes_reports(
    model_env: dict[str, str], bentoml_home: Path, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "BENTOML_HOME": str(bentoml_home),
        **model_env,
    }
    out = tmp_path / "loadtest"
    # Thresholds are timing limits: judged on full runs, not in tests. The exit status here
    # means every scenario ran and was reported.
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.run", "all", "--profile", "quick", "--out", str(out), "--no-thresholds"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("baseline", "spike", "cache"):
        folder = out / name
        summary = json.loads((folder / "summary.json").read_text())
        f = summary["figures"]
        assert f["requests"] > 100, name
        assert f["invalid_answers"] == 0, f["failures_by_error"]
        assert f["server_errors"] == 0 and f["errors_pct"] == 0, f["failures_by_error"]
        assert {e["endpoint"] for e in f["endpoints"]} >= {"/predict", "/predict/ab", "/batch", "/health"}
        # every answered prediction is in the analytics database, counted by the service itself
        assert f["analytics"]["total"] == f["predictions_answered"]
        assert {"api", "postgresql", "redis", "locust"} <= set(f["resources"])
        report = (folder / "report.md").read_text()
        for heading in ("## Results", "## Per endpoint", "## Resources", "## Analysis", "## Plots"):
            assert heading in report, (name, heading)
        for png in ("throughput", "latency", "endpoints", "resources", "dashboard"):
            assert (folder / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG", (name, png)
    cache = json.loads((out / "cache" / "summary.json").read_text())["figures"]
    assert cache["hit_rate"] >= 85  # every text repeats: only each one's first use misses
    assert cache["hits_timed"] > 0 and cache["misses_timed"] > 0 and cache["miss_hit_ratio"] is not None
    spike = json.loads((out / "spike" / "summary.json").read_text())["figures"]
    assert spike["users"] == 60  # the shape reached its peak
