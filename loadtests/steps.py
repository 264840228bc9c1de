"""The capacity steps: load at fixed shares of one replica's capacity, and what the service's
saturation gauge, latency and sheds were at each. `make loadtest SCENARIO=steps` runs it; the
table in docs/scaling.md, from which the autoscaler's target comes, is its output.

loadtests/step_shape.py holds each share of the capacity's users for a step. `table` reads the run's
folder afterwards: the requests' timeline (locustfile.py --timeline) and the saturation sampled
from /metrics every second (resources.csv), over each step but its first SETTLE_S seconds.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

SETTLE_S = 20.0  # of each step (a quarter of a shorter one), left out: users spawning, the adaptive limit moving


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def table(folder: Path, users: int, step_s: float, step_shares: list[float]) -> list[dict[str, Any]]:
    """One row per step: its share and users, answered requests a second, their p95, the shed
    share, and the mean of each saturation signal and of the API's cores in use."""
    with (folder / "timeline.csv").open() as f:
        rows = list(csv.reader(f))
    start = float(rows[0][1])  # the header line: "start", the test's start time
    events = [(float(t), kind, float(ms)) for t, kind, ms in rows[1:]]
    with (folder / "resources.csv").open() as f:
        samples = list(csv.DictReader(f))
    result = []
    settle = min(SETTLE_S, step_s / 4)
    for i, share in enumerate(step_shares):
        lo, hi = start + i * step_s + settle, start + (i + 1) * step_s
        inside = [(kind, ms) for t, kind, ms in events if lo <= t < hi]
        answered = [ms for kind, ms in inside if kind == "answered"]
        shed = sum(1 for kind, _ in inside if kind == "shed")
        window = [s for s in samples if lo <= float(s["t"]) < hi]

        def mean_of(column: str, window: list[dict[str, str]] = window) -> float | None:
            values = [float(s[column]) for s in window if s.get(column) not in (None, "")]
            return _mean(values)

        result.append(
            {
                "share": share,
                "users": max(1, round(users * share)),
                "answered_req_s": round(len(answered) / (hi - lo), 1),
                "p50_ms": _pct(answered, 0.5),
                "p95_ms": _pct(answered, 0.95),
                "shed_pct": round(100 * shed / max(1, len(answered) + shed), 2),
                "saturation_in_flight": mean_of("saturation_in_flight"),
                "saturation_queue_delay": mean_of("saturation_queue_delay"),
                "api_cores": mean_of("api_cores"),
            }
        )
    return result


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write(folder: Path, rows: list[dict[str, Any]]) -> str:
    """steps.json and steps.md in `folder`; the markdown table."""
    (folder / "steps.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| load (share of capacity) | users | answered req/s | p50 ms | p95 ms | shed % "
        "| saturation: in_flight | saturation: queue_delay | API cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['share'] * 100:.0f}% | {r['users']} | {_fmt(r['answered_req_s'], 1)} | {_fmt(r['p50_ms'], 0)} "
            f"| {_fmt(r['p95_ms'], 0)} | {_fmt(r['shed_pct'])} | {_fmt(r['saturation_in_flight'])} "
            f"| {_fmt(r['saturation_queue_delay'])} | {_fmt(r['api_cores'])} |"
        )
    text = "\n".join(lines) + "\n"
    (folder / "steps.md").write_text(text)
    return text


def saturation_reader(url: str) -> dict[str, Any]:
    """ResourceSampler columns: each saturation signal, read from the service's /metrics."""
    import httpx

    client = httpx.Client(timeout=2)
    last: dict[str, Any] = {"at": 0.0, "values": {}}

    def read(signal: str) -> float | None:
        import time

        if time.monotonic() - last["at"] > 0.5:  # one /metrics read per sample for both columns
            values = {}
            for line in client.get(f"{url}/metrics").text.splitlines():
                if line.startswith("sentiment_saturation{"):
                    name = line.split('signal="', 1)[1].split('"', 1)[0]
                    values[name] = float(line.rsplit(" ", 1)[1])
            last.update(at=time.monotonic(), values=values)
        return last["values"].get(signal)

    return {f"saturation_{s}": (lambda s=s: read(s)) for s in ("in_flight", "queue_delay")}
