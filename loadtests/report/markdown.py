"""The load-test report of one scenario, from the files loadtests/run.py leaves in its folder,
and the markdown table every suite's report is written with (`table`).

    python -m loadtests.report.markdown var/loadtests/<time>/<scenario> [--prometheus URL]

Inputs: Locust's CSV files (locust_stats.csv, locust_stats_history.csv, locust_failures.csv),
outcomes.json (cache hits and their latencies, from the locustfile), the service's /metrics
before and after, /analytics/summary after (run.json) and resources.csv (CPU and memory per
process group), read by figures.py. Output: report.md beside them and PNG plots in plots/
(plots.py): the original report's tables filled from this run, with the original's figures
(`ORIGINAL`) beside them and this project's targets (`TARGETS`) judged.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtests.report.figures import figures
from loadtests.report.plots import plots

# The original deployment's report (4 threads, a separate load generator).
ORIGINAL: dict[str, dict[str, float]] = {
    "baseline": {"req_s": 100, "p50": 65, "p95": 120, "p99": 180, "max": 250, "errors_pct": 0.5, "hit_rate": 72},
    "spike": {"peak_req_s": 350, "p95": 140, "p99": 350, "rate_limited_pct": 15},
    "cache": {"hit_rate": 95, "hit_p50": 8, "miss_p50": 65},
}
# This project's targets on 2 cores: (figure, limit, how it compares).
TARGETS: dict[str, list[tuple[str, float, str]]] = {
    "baseline": [
        ("p50", 20, "<="),
        ("p95", 60, "<="),
        ("p99", 150, "<="),
        ("errors_pct", 0, "<="),
        ("shed_pct", 0, "<="),
    ],
    "spike": [
        ("server_errors", 0, "<="),
        ("answered_p99", 350, "<="),
        ("max", 1000, "<="),
        ("shed_pct", 10, "<="),
    ],
    "cache": [("hit_rate", 95, ">="), ("hit_p50", 3, "<=")],
}


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table's lines: the header, its rule, a line per row (cells as given, str()ed)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


LABELS = {
    "users": "users (peak)",
    "duration_s": "duration (s)",
    "requests": "requests",
    "req_s": "throughput (req/s, mean)",
    "peak_req_s": "throughput (req/s, peak)",
    "p50": "p50 latency (ms)",
    "p95": "p95 latency (ms)",
    "p99": "p99 latency (ms)",
    "max": "max latency (ms)",
    "errors_pct": "errors other than 429 and sheds (%)",
    "server_errors": "5xx answers other than sheds",
    "shed_pct": "shed: 503 with Retry-After (%)",
    "answered_p50": "answered (200): p50 (ms)",
    "answered_p95": "answered (200): p95 (ms)",
    "answered_p99": "answered (200): p99 (ms)",
    "shed_p99": "shed: p99 (ms)",
    "rate_limited_pct": "rate limited, 429 (%)",
    "hit_rate": "cache hit rate (%)",
    "hit_p50": "cache hits: p50 (ms)",
    "miss_p50": "cache misses: p50 (ms)",
    "hit_p95": "cache hits: p95 (ms)",
    "miss_p95": "cache misses: p95 (ms)",
}
# The rows of the results table, in order.
RESULTS = (
    "users",
    "duration_s",
    "requests",
    "req_s",
    "peak_req_s",
    "p50",
    "p95",
    "p99",
    "max",
    "answered_p50",
    "answered_p95",
    "answered_p99",
    "errors_pct",
    "server_errors",
    "shed_pct",
    "shed_p99",
    "rate_limited_pct",
    "hit_rate",
    "hit_p50",
    "hit_p95",
    "miss_p50",
    "miss_p95",
)


# --- judgement -----------------------------------------------------------------------------


def violations(scenario: dict[str, Any], figs: dict[str, Any]) -> list[str]:
    """The run's pass/fail thresholds: non-429 errors over 1%, or p95 over the scenario's limit."""
    out = []
    if figs["errors_pct"] is None or figs["requests"] == 0:
        out.append("no requests were answered")
        return out
    if figs["errors_pct"] > 1.0:
        out.append(f"errors other than 429: {figs['errors_pct']}% > 1%")
    if figs["p95"] is not None and figs["p95"] > scenario["p95_limit_ms"]:
        out.append(f"p95 {figs['p95']:.0f} ms > limit {scenario['p95_limit_ms']:.0f} ms")
    return out


def target_lines(name: str, figs: dict[str, Any]) -> list[str]:
    """One line per target of the scenario (loadtests/plan.py): met, or missed by how much."""
    lines = []
    for key, limit, op in TARGETS.get(name, []):
        value = figs.get(key)
        if value is None:
            lines.append(f"- {LABELS[key]}: no data (target {op} {limit:g})")
            continue
        met = value <= limit if op == "<=" else value >= limit
        if met:
            lines.append(f"- {LABELS[key]}: **{round(value, 2):g}**, target {op} {limit:g}: met")
        else:
            gap = value - limit
            rel = f" ({100 * gap / limit:+.0f}%)" if limit else ""
            lines.append(
                f"- {LABELS[key]}: **{round(value, 2):g}**, target {op} {limit:g}:"
                f" **missed by {abs(round(gap, 2)):g}{rel}**"
            )
    return lines


def analysis(name: str, figs: dict[str, Any], machine: dict[str, Any]) -> list[str]:
    """The targets, then what the CPU, the model, the cache and the limiter did."""
    lines = target_lines(name, figs)
    resources, service = figs["resources"], figs["service"]
    cpus = machine.get("cpus") or 2
    if resources:
        used = sum(group["cores_mean"] for group in resources.values())
        parts = ", ".join(
            f"{group} {usage['cores_mean']:.2f}"
            for group, usage in sorted(resources.items(), key=lambda kv: -kv[1]["cores_mean"])
        )
        verdict = (
            "the cores were saturated, so much of the latency is queueing for CPU"
            if used > 0.85 * cpus
            else "the cores had headroom"
        )
        lines.append(
            f"- CPU: the processes sampled used {used:.2f} of the machine's {cpus} cores on average"
            f" ({parts}); {verdict}."
        )
    if service:
        workers = machine.get("workers")
        busy = service.get("inference_busy") or 0.0
        share = f" ({100 * busy / workers:.0f}% of the {workers} workers' time)" if workers else ""
        lines.append(
            f"- Model: {service['texts_inferred']:,} texts inferred in {service['forward_calls']:,} forward calls"
            f" (mean batch {service['mean_batch']}, {service['inference_ms_per_call']} ms of wall time per call); the"
            f" workers spent {busy:.2f} worker-seconds per second in forward calls{share}. A forward call holds"
            " its worker's model thread: texts that miss the cache meanwhile wait for the next batch, so misses"
            " queue as this nears 100%, and batches grow (the worker's in-process batcher, service/batching.py)."
        )
        lines.append(
            f"- Service counters: cache hit rate {service['cache_hit_rate']}% (per text),"
            f" {service['rate_limited']:,} rate-limited,"
            f" {service['overload_rejections']:,} overload rejections, {service['predictions']:,} predictions,"
            f" {service['analytics_rows_written']:,} analytics rows written"
            f" ({service.get('analytics_rows_dropped', 0):,} dropped)."
        )
    if figs.get("miss_hit_ratio"):
        lines.append(
            f"- Cache: a miss (p50 {figs['miss_p50']:.0f} ms) is {figs['miss_hit_ratio']}x a hit"
            f" (p50 {figs['hit_p50']:.0f} ms), measured on {figs['hits_timed']:,} hits and {figs['misses_timed']:,}"
            " misses of single-text requests in this run."
        )
    if figs["rate_limited_pct"]:
        lines.append(
            f"- Rate limiting: {figs['rate_limited_pct']}% of requests got 429: clients above 100 requests per minute"
            " on /predict and /predict/ab or 20 on /batch (per client, over all workers, in Redis)."
        )
    if figs["invalid_answers"]:
        lines.append(f"- **{figs['invalid_answers']} answers failed validation** (see the failures table).")
    return lines


# --- the report ------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 or value == 0 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _diff(value: Any, original: Any) -> str:
    if value is None or original is None:
        return "–"
    d = value - original
    return f"{d:+,.1f}" + (f" ({100 * d / original:+.0f}%)" if original else "")


def _header(run: dict[str, Any], bad: list[str]) -> list[str]:
    """The title, what ran against what, and the verdict."""
    scenario = run["scenario"]
    when = datetime.fromtimestamp(run["started"], UTC).strftime("%Y-%m-%d %H:%M UTC")
    health = run.get("health") or {}
    models = health.get("model", {})
    return [
        f"# Load test: {scenario['name']}",
        "",
        f"{scenario['description']}. Run {when} against {run['url']}, {run['machine']['cpus']} cores and"
        f" {run['machine']['memory_gb']} GiB shared by the service, Locust, PostgreSQL and Redis."
        f" Model A `{models.get('A', '?')}`, B `{models.get('B', '?')}`; cache `{health.get('cache', '?')}`,"
        f" database `{health.get('database', '?')}`. Traffic: 70% /predict, 20% /predict/ab, 10% /batch,"
        f" /analytics/* and /health; {int(100 * scenario['repeat_share'])}% of texts drawn from"
        f" {scenario['repeat_pool']} repeated ones, the rest never seen before; each user has its own client"
        " address and waits 0.5 to 1.5 s between requests.",
        "",
        f"Verdict: **{'pass' if not bad else 'fail: ' + '; '.join(bad)}** (thresholds: errors other than 429 at"
        f" most 1%, p95 at most {scenario['p95_limit_ms']:.0f} ms).",
    ]


def _results(figs: dict[str, Any], original: dict[str, float]) -> list[str]:
    """This run's figures beside the original's."""
    rows = [(LABELS[k], _fmt(figs.get(k)), _fmt(original.get(k)), _diff(figs.get(k), original.get(k))) for k in RESULTS]
    return ["## Results", "", *table(("figure", "this run", "original", "difference"), rows)] + [
        "",
        "Latency is Locust's, measured at the client on the same machine, 429s and sheds included; the",
        "answered rows count only 200s. A shed is a 503 with `Retry-After`: the service refused the request",
        "at once, because its texts would have waited longer than the queue-delay budget (MAX_QUEUE_DELAY_MS)",
        "or because the worker already held as many requests as it answers within that budget (its adaptive",
        "concurrency limit, `sentiment_concurrency_limit`).",
        "Cache hits and misses are the single-text requests answered `cached: true` and `false`.",
    ]


def _per_endpoint(endpoints: list[dict[str, Any]]) -> list[str]:
    header = ("endpoint", "requests", "req/s", "avg ms", "p50 ms", "p95 ms", "p99 ms", "429", "shed")
    keys = ("requests", "req_s", "avg", "p50", "p95", "p99", "rate_limited", "shed", "other_failures", "hit_rate")
    rows = [(row["endpoint"], *(_fmt(row[k]) for k in keys)) for row in endpoints]
    return ["## Per endpoint", "", *table((*header, "other failures", "cache hit rate %"), rows)]


def _resources_section(resources: dict[str, dict[str, float]]) -> list[str]:
    lines = ["## Resources", ""]
    if not resources:
        return lines + ["Not sampled: the service was not started by this run."]
    header = ("process group", "CPU mean (cores)", "CPU max (cores)", "memory mean (MB)", "memory max (MB)")
    rows = [
        (group, f"{u['cores_mean']:.2f}", f"{u['cores_max']:.2f}", f"{u['mb_mean']:,.0f}", f"{u['mb_max']:,.0f}")
        for group, u in sorted(resources.items())
        if "cores_mean" in u
    ]
    lines += [
        "Sampled every second (CPU as cores in use; memory as PSS, so shared pages count once).",
        "",
        *table(header, rows),
    ]
    if "used_memory_mb_max" in resources.get("redis", {}):
        lines.append(f"\nRedis `used_memory` peak: {resources['redis']['used_memory_mb_max']:.2f} MB.")
    return lines


def _service_view(analytics: dict[str, Any], answered: int) -> list[str]:
    """The service's /analytics/summary over the run."""
    latency = analytics["latency_ms"]
    return [
        "## The service's own view (/analytics/summary over the run)",
        "",
        f"{analytics['total']:,} predictions recorded ({answered:,} answered to Locust), cache hit rate"
        f" {100 * (analytics['cache_hit_rate'] or 0):.1f}%, server-side latency p50 {latency['p50']} ms,"
        f" p95 {latency['p95']} ms, p99 {latency['p99']} ms; {analytics['rate_limited']:,} rate-limited"
        f" and {analytics['errors']:,} other errors recorded.",
    ]


def build(folder: Path, prometheus_url: str | None = None) -> dict[str, Any]:
    """Write report.md and plots/ for one scenario folder; return the figures and violations."""
    run = json.loads((folder / "run.json").read_text())
    scenario = run["scenario"]
    name = scenario["name"]
    figs = figures(folder)
    bad = violations(scenario, figs)
    made = plots(folder, prometheus_url, run)
    lines = [
        *_header(run, bad),
        "",
        *_results(figs, ORIGINAL.get(name, {})),
        "",
        *_per_endpoint(figs["endpoints"]),
        "",
        *_resources_section(figs["resources"]),
    ]
    if figs.get("analytics"):
        lines += ["", *_service_view(figs["analytics"], figs["predictions_answered"])]
    lines += ["", "## Analysis", "", *analysis(name, figs, run["machine"])]
    if figs["failures_by_error"]:
        errors = sorted(figs["failures_by_error"].items(), key=lambda kv: -kv[1])
        rows = [(error.replace("|", "/"), f"{count:,}") for error, count in errors]
        lines += ["", "## Failures", "", *table(("endpoint: error", "count"), rows)]
    if made:
        lines += ["", "## Plots", ""]
        for title, path in made:
            lines += [f"### {title}", "", f"![{title}]({path})", ""]
    (folder / "report.md").write_text("\n".join(lines).rstrip() + "\n")
    result = {"scenario": name, "figures": figs, "violations": bad, "report": str(folder / "report.md")}
    (folder / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def console_summary(result: dict[str, Any]) -> str:
    """The run in two lines: its main figures and verdict, and where the report is."""
    figs = result["figures"]
    verdict = "pass" if not result["violations"] else "FAIL: " + "; ".join(result["violations"])
    return (
        f"[{result['scenario']}] {figs['requests']:,} requests, {figs['req_s']} req/s, p50 {_fmt(figs['p50'])} ms,"
        f" p95 {_fmt(figs['p95'])} ms, p99 {_fmt(figs['p99'])} ms (answered {_fmt(figs['answered_p99'])} ms),"
        f" errors {figs['errors_pct']}% (+{figs['rate_limited_pct']}% 429, {figs['shed_pct']}% shed),"
        f" cache hits {figs['hit_rate']}%: {verdict}\n  report: {result['report']}"
    )


def _step_fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_steps(folder: Path, rows: list[dict[str, Any]]) -> str:
    """steps.json and steps.md in `folder`; the markdown table."""
    (folder / "steps.json").write_text(json.dumps(rows, indent=2))
    header: tuple[str, ...] = ("load (share of capacity)", "users", "answered req/s", "p50 ms", "p95 ms", "shed %")
    header += ("saturation: in_flight", "saturation: queue_delay", "API cores")
    digits = {"answered_req_s": 1, "p50_ms": 0, "p95_ms": 0}
    keys = ("answered_req_s", "p50_ms", "p95_ms", "shed_pct", "saturation_in_flight", "saturation_queue_delay")
    cells = [
        (f"{r['share'] * 100:.0f}%", r["users"], *(_step_fmt(r[k], digits.get(k, 2)) for k in (*keys, "api_cores")))
        for r in rows
    ]
    text = "\n".join(table(header, cells)) + "\n"
    (folder / "steps.md").write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prometheus", default=None, help="re-render the dashboard plot from this Prometheus")
    args = parser.parse_args()
    print(console_summary(build(args.folder, args.prometheus)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
