"""The chaos run's report: report.json (everything), report.md (the tables), timeline.png
(answered, shed and failed requests per second and the answered p99, fault windows shaded)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from loadtests.chaos import plan


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} ms"


def timeline_png(run: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = run["figures"]["per_second"]
    ts = [s["t"] for s in series]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 6.5), sharex=True, layout="constrained")
    top.plot(ts, [s["answered"] for s in series], label="answered (200)", color="tab:blue")
    top.plot(ts, [s["shed"] for s in series], label="shed (503, Retry-After)", color="tab:orange")
    top.plot(ts, [s["failed"] for s in series], label="failed (connection errors, other statuses)", color="tab:red")
    top.set_ylabel("requests/s (by second sent)")
    top.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    bottom.plot(ts, [math.nan if s["p99_ms"] is None else s["p99_ms"] for s in series], color="tab:purple")
    bottom.set_yscale("log")
    bottom.set_ylabel("answered p99 (ms)")
    bottom.set_xlabel("seconds since the load started")
    colours = ["#fdd49e", "#c6dbef", "#fcbba1", "#d9d9d9", "#c7e9c0", "#dadaeb"]
    for n, w in enumerate(run["faults"]):
        for ax in (top, bottom):
            # an instant fault still gets a visible band
            ax.axvspan(w["start_s"], max(w["end_s"], w["start_s"] + 0.5), color=colours[n % len(colours)], alpha=0.7)
        top.annotate(
            w["name"],
            (w["start_s"], 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -2),
            textcoords="offset points",
            rotation=90,
            va="top",
            fontsize=8,
        )
    for ax in (top, bottom):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"Chaos run ({run['profile']['name']} profile): {run['profile']['users']} users, faults shaded")
    fig.savefig(path, dpi=80)
    plt.close(fig)


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
        "| fault | what | from | to | answered p99 | requests | answered | shed | other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for w in run["faults"]:
        during = lat["by_fault"].get(w["name"], {})
        outcomes = during.get("outcomes", {})
        other = sum(n for k, n in outcomes.items() if k not in ("200", "503 shed"))
        lines.append(
            f"| {w['name']} | {plan.DESCRIPTIONS[w['name']]}: {w['error'] or w['detail']} | {w['start_s']:.1f} s "
            f"| {w['end_s']:.1f} s | {_ms(during.get('p99_ms'))} | {during.get('requests', 0)} "
            f"| {during.get('answered', 0)} | {outcomes.get('503 shed', 0)} | {other} |"
        )
    lines += [
        "",
        "## Every answer stored once?",
        "",
        "| figure | value |",
        "|---|---|",
        f"| predictions answered (ids in 200 bodies) | {f['predictions_answered']:,} |",
        f"| rows in `predictions` | {f['rows_stored']:,} |",
        f"| **missing** (answered, no row; must be 0) | {f['missing']:,} |",
        f"| **duplicated** (an id answered or stored twice; must be 0) | "
        f"{f['duplicated_answered'] + f['duplicated_stored']:,} |",
        f"| extra (a row never answered: in flight when a worker died or a connection broke) | {f['extra']:,} |",
        f"| analytics drained after the load | {run['drain']['rows']:,} rows after {run['drain']['seconds']} s "
        f"({'steady' if run['drain']['drained'] else 'not drained: timed out'}) |",
    ]
    if f["missing"]:
        by = ", ".join(f"{k}: {n}" for k, n in f["missing_by_window"].items())
        lines += ["", f"Missing rows by the fault on when (or within 2 s after) they were answered: {by}."]
    lines += [
        "",
        "## Statuses",
        "",
        "| outcome | requests |",
        "|---|---|",
        *(f"| {k} | {n:,} |" for k, n in f["statuses"].items()),
        "",
        "Connection errors by type: "
        + (", ".join(f"{k} {n}" for k, n in f["connection_errors"].items()) or "none")
        + ". 5xx other than a shed: "
        + (", ".join(f"{k}: {n}" for k, n in f["server_errors"].items()) or "none")
        + ".",
        "",
        "## Latency of answered requests",
        "",
        "| requests sent | requests | answered | p50 | p99 | slowest |",
        "|---|---|---|---|---|---|",
    ]
    for name, key in (("overall", "overall"), ("during faults", "during_faults"), ("outside", "outside_faults")):
        x = lat[key]
        lines.append(
            f"| {name} | {x['requests']:,} | {x['answered']:,} | {_ms(x['p50_ms'])} | {_ms(x['p99_ms'])} "
            f"| {_ms(x['max_ms'])} |"
        )
    lines += ["", "![timeline](timeline.png)", ""]
    return "\n".join(lines)


def write(run: dict[str, Any], out: Path) -> None:
    (out / "report.json").write_text(json.dumps(run, indent=2))
    timeline_png(run, out / "timeline.png")
    (out / "report.md").write_text(markdown(run))
