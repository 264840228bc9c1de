"""Every suite's plots, as PNG files. The load-test report's, in the run folder's plots/ (`plots`):
throughput and users, latency percentiles over time, latency by endpoint, CPU and memory by
process group, and the Grafana dashboard's main panels from a Prometheus' range queries
(`plot_dashboard`) when the run had one. The chaos run's timeline (`chaos_timeline`), and the
bench's servers side by side (`bench_chart`).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtests.report.figures import aggregated_history, endpoint_names, locust_stats, number, read_csv, resource_groups
from tests.support.prometheus import PrometheusClient, dashboard_queries

DASHBOARD_TITLE = "Dashboard panels, from Prometheus' queries of the Grafana dashboard"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _over_time(plt: Any, history: list[dict[str, str]], out: Path) -> list[tuple[str, str]]:
    """Throughput and users, and latency percentiles, from Locust's history."""
    t0 = float(history[0]["Timestamp"])
    ts = [float(r["Timestamp"]) - t0 for r in history]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(ts, [number(r["Requests/s"]) or 0 for r in history], label="requests/s")
    ax.plot(ts, [number(r["Failures/s"]) or 0 for r in history], label="failures/s (429 included)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("per second")
    users_axis = ax.twinx()
    users_axis.plot(ts, [int(r["User Count"]) for r in history], color="grey", linestyle="--", label="users")
    users_axis.set_ylabel("users")
    fig.legend(loc="upper left", bbox_to_anchor=(0.08, 0.92))
    ax.set_title("Throughput and users")
    ax.grid(alpha=0.3)
    _save(plt, fig, out / "throughput.png")

    fig, ax = plt.subplots(figsize=(10, 4))
    for col in ("50%", "95%", "99%"):
        # a sample without the figure is a gap in the line
        values = [math.nan if (v := number(r[col])) is None else v for r in history]
        ax.plot(ts, values, label=f"p{col[:-1]}")
    ax.set_xlabel("seconds")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.set_title("Latency percentiles (Locust's sliding window)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    _save(plt, fig, out / "latency.png")
    return [
        ("Throughput and users over time", "plots/throughput.png"),
        ("Latency percentiles over time", "plots/latency.png"),
    ]


def _by_endpoint(plt: Any, stats: dict[str, dict[str, str]], names: list[str], out: Path) -> tuple[str, str]:
    """Mean and p95 latency of each request name."""
    fig, ax = plt.subplots(figsize=(10, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [number(stats[n]["Average Response Time"]) or 0 for n in names], 0.4, label="mean")
    ax.bar([x + 0.2 for x in xs], [number(stats[n]["95%"]) or 0 for n in names], 0.4, label="p95")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("ms")
    ax.set_title("Latency by endpoint")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    _save(plt, fig, out / "endpoints.png")
    return ("Latency by endpoint", "plots/endpoints.png")


def _resources(plt: Any, rows: list[dict[str, str]], out: Path) -> tuple[str, str]:
    """CPU and memory of each process group over time, from resources.csv."""
    t0 = float(rows[0]["t"])
    ts = [float(r["t"]) - t0 for r in rows[1:]]
    fig, (cpu_axis, memory_axis) = plt.subplots(1, 2, figsize=(12, 4))
    for group in resource_groups(rows):
        cpu_axis.plot(ts, [number(r.get(f"{group}_cores")) or 0 for r in rows[1:]], label=group)
        memory_axis.plot(ts, [number(r.get(f"{group}_mb")) or 0 for r in rows[1:]], label=group)
    cpu_axis.set_title("CPU (cores in use)")
    memory_axis.set_title("Memory (PSS, MB)")
    for axis in (cpu_axis, memory_axis):
        axis.set_xlabel("seconds")
        axis.grid(alpha=0.3)
        axis.legend()
    _save(plt, fig, out / "resources.png")
    return ("CPU and memory by process group", "plots/resources.png")


def plots(folder: Path, prometheus_url: str | None, run: dict[str, Any]) -> list[tuple[str, str]]:
    """Draw the run's plots into folder/plots; return (title, path relative to folder) of each."""
    plt = _pyplot()

    out = folder / "plots"
    out.mkdir(exist_ok=True)
    made: list[tuple[str, str]] = []
    history = aggregated_history(folder)
    if history:
        made += _over_time(plt, history, out)

    stats = locust_stats(folder)
    names = endpoint_names(stats)
    if names:
        made.append(_by_endpoint(plt, stats, names, out))

    rows = read_csv(folder / "resources.csv")
    if len(rows) > 2:
        made.append(_resources(plt, rows, out))

    if not prometheus_url and (out / "dashboard.png").exists():  # rendered when the run had its Prometheus
        made.append((DASHBOARD_TITLE, "plots/dashboard.png"))
    if prometheus_url:
        try:
            plot_dashboard(prometheus_url, run["started"], run["ended"] + 10, out / "dashboard.png")
            made.append((DASHBOARD_TITLE, "plots/dashboard.png"))
        except Exception as exc:  # the report stands without it
            print(f"dashboard plot skipped: {exc}")
    return made


# --- the dashboard's panels -----------------------------------------------------------------

# The panels of the README's plot, by title, as they are in the dashboard.
PLOTTED = (
    "Requests/s by endpoint",
    "Latency of predictions (p50, p95, p99)",
    "5xx error rate",
    "Rate-limited (429) per second",
    "Cache hit rate",
    "Inference time per forward call (p50, p95) and mean batch size",
    "A/B requests/s per variant",
    "Memory of the API workers",
)


def _legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), template) or str(labels)


def plot_dashboard(prometheus_url: str, start: float, end: float, out: Path, step: float | None = None) -> Path:
    """Render the main dashboard panels from Prometheus' range queries into one PNG."""
    plt = _pyplot()
    import matplotlib.dates as mdates

    step = step or max(1.0, (end - start) / 300)
    client = PrometheusClient(prometheus_url)
    queries = [q for q in dashboard_queries() if q.source in PLOTTED]
    fig, axes = plt.subplots(4, 2, figsize=(14, 14), sharex=True)
    for ax, title in zip(axes.flat, PLOTTED, strict=True):
        for q in (q for q in queries if q.source == title):
            if "mean batch" in q.legend:
                continue  # another unit: kept to the dashboard's second axis
            scale, unit = {"bytes": (2**30, "GiB"), "s": (1e-3, "ms"), "percentunit": (0.01, "%")}.get(q.unit, (1, ""))
            for series in client.query_range(q.expr, start, end, step):
                xs = [datetime.fromtimestamp(float(t), UTC) for t, _ in series["values"]]
                ys = [float(v) / scale for _, v in series["values"]]
                ax.plot(xs, ys, label=_legend(q.legend, series["metric"]))
            ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left")
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M" if end - start > 1800 else "%H:%M:%S"))
    fig.suptitle(
        f"Sentiment service dashboard panels from Prometheus, {datetime.fromtimestamp(start, UTC):%Y-%m-%d %H:%M} "
        f"to {datetime.fromtimestamp(end, UTC):%H:%M} UTC",
        fontsize=12,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


# --- the chaos run -------------------------------------------------------------------------


def chaos_timeline(run: dict[str, Any], path: Path) -> None:
    """Answered, shed and failed requests per second and the answered p99, fault windows shaded."""
    plt = _pyplot()

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


# --- the bench -------------------------------------------------------------------------------


def bench_chart(result: dict[str, Any], path: Path) -> Path:
    """Requests/s and p95 latency of each server by client count, new texts only (the bench's
    `unique` cases, medians over its rounds), from `make bench`'s result (var/bench.json)."""
    plt = _pyplot()
    cases = [c for c in result["cases"] if c["mode"] == "unique"]
    servers = list(dict.fromkeys(c["server"] for c in cases))
    fig, (rate, p95) = plt.subplots(1, 2, figsize=(11, 4))
    for server in servers:
        mine = sorted((c for c in cases if c["server"] == server), key=lambda c: c["users"])
        users = [c["users"] for c in mine]
        rate.plot(users, [c["req_per_s"] for c in mine], marker="o", label=server)
        p95.plot(users, [c["p95_ms"] for c in mine], marker="o", label=server)
    rate.set_title("Throughput (requests/s)")
    p95.set_title("p95 latency (ms)")
    p95.set_yscale("log")
    for axis in (rate, p95):
        axis.set_xlabel("closed-loop clients")
        axis.set_xticks(sorted({c["users"] for c in cases}))
        axis.grid(alpha=0.3, which="both")
        axis.legend()
    settings = result.get("settings", {})
    fig.suptitle(
        f"make bench: new texts to {result.get('model', '?')}, medians of {settings.get('rounds', '?')} rounds"
        f" of {settings.get('seconds', '?')} s"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(plt, fig, path)
    return path
