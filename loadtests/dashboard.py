"""The dashboard's main panels as one PNG, from a Prometheus' range queries (the load-test
reports embed it):

    python -m loadtests.dashboard --prometheus http://127.0.0.1:9090 --minutes 15 --out dashboard.png
"""

from __future__ import annotations

import argparse
import re
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.support.prometheus import PrometheusClient, dashboard_queries

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    args = parser.parse_args()
    end = time.time()
    path = plot_dashboard(args.prometheus, end - args.minutes * 60, end, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
