"""The load-test report's plots, as PNG files in the run folder's plots/: throughput and users,
latency percentiles over time, latency by endpoint, CPU and memory by process group, and the
dashboard's panels from Prometheus (loadtests/dashboard.py) when the run had one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from loadtests.figures import aggregated_history, endpoint_names, locust_stats, number, read_csv, resource_groups

DASHBOARD_TITLE = "Dashboard panels, from Prometheus' queries of the Grafana dashboard"


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        from loadtests.dashboard import plot_dashboard

        try:
            plot_dashboard(prometheus_url, run["started"], run["ended"] + 10, out / "dashboard.png")
            made.append((DASHBOARD_TITLE, "plots/dashboard.png"))
        except Exception as exc:  # the report stands without it
            print(f"dashboard plot skipped: {exc}")
    return made
