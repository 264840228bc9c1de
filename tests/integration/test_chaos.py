"""`make chaos PROFILE=quick`: every fault injected under load, every answered prediction stored once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.chaos.__main__ import QUICK
from tests.support.serving import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_quick_chaos_run_loses_and_duplicates_no_answered_prediction(
    model_env: dict[str, str], bentoml_home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "chaos"
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), **model_env}
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.chaos", "--profile", "quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout[-4000:] + result.stderr[-4000:]
    assert (out / "report.json").exists(), log
    run = json.loads((out / "report.json").read_text())
    f = run["figures"]
    # every fault was injected and recovered from, in the plan's order
    assert [w["name"] for w in run["faults"]] == [fault.name for fault in QUICK.faults], log
    assert [w["error"] for w in run["faults"]] == [None] * len(QUICK.faults), log
    assert all(w["end_s"] >= w["start_s"] for w in run["faults"])
    assert f["predictions_answered"] > 200 and f["statuses"].get("200", 0) > 100, f["statuses"]
    assert f["missing"] == 0, (f["missing_by_window"], f["missing_sample"][:5])
    assert f["duplicated_answered"] == 0 and f["duplicated_stored"] == 0
    assert f["server_errors"] == {}, f["statuses"]
    assert f["answers_without_ids"] == 0
    assert result.returncode == 0, log
    report = (out / "report.md").read_text()
    for heading in ("## Faults", "## Every answer stored once?", "## Statuses", "## Latency of answered requests"):
        assert heading in report, heading
    assert (out / "timeline.png").read_bytes()[:4] == b"\x89PNG"
