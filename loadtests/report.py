"""The load-test report of one scenario, from the files loadtests/run.py leaves in its folder.

    python -m loadtests.report var/loadtest/<time>/<scenario> [--prometheus URL]

Inputs: Locust's CSV files (locust_stats.csv, locust_stats_history.csv, locust_failures.csv),
outcomes.json (cache hits and their latencies, from the locustfile), the service's /metrics
before and after, /analytics/summary after (run.json) and resources.csv (CPU and memory per
process group). Output: report.md beside them and PNG plots in plots/: the original report's
tables filled from this run, with the original's figures beside them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

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
ENDPOINTS = ["/predict", "/predict/ab", "/batch", "/analytics/summary", "/analytics/ab", "/health"]


# --- inputs ------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def metric_totals(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics text, keyed by (name, sorted labels)."""
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _sum(metrics: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    return sum(
        v for (n, ls), v in metrics.items() if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    )


# --- figures -------------------------------------------------------------------------------


def _failures(rows: list[dict[str, str]]) -> tuple[int, int, int, int, dict[str, int]]:
    """(429s, sheds: 503 with Retry-After, other 5xx, other failures, count per error text)."""
    limited = shed = server = other = 0
    by_error: dict[str, int] = {}
    for row in rows:
        n = int(row["Occurrences"])
        error = row["Error"]
        by_error[f"{row['Name']}: {error}"] = n
        if "(429)" in error:
            limited += n
        elif "shed (503" in error:
            shed += n
        elif "(503)" in error or "HTTP 5" in error:
            server += n
        else:
            other += n
    return limited, shed, server, other, by_error


def figures(folder: Path) -> dict[str, Any]:
    run = json.loads((folder / "run.json").read_text())
    stats = {row["Name"]: row for row in _read_csv(folder / "locust_stats.csv")}
    total = stats.get("Aggregated", {})
    history = [r for r in _read_csv(folder / "locust_stats_history.csv") if r["Name"] == "Aggregated"]
    limited, shed, server, other, by_error = _failures(_read_csv(folder / "locust_failures.csv"))
    outcomes = json.loads((folder / "outcomes.json").read_text()) if (folder / "outcomes.json").exists() else {}
    requests = int(total.get("Request Count", 0) or 0)
    duration = run["ended"] - run["started"]
    hits = sum(c["hits"] for c in outcomes.get("cache", {}).values())
    misses = sum(c["misses"] for c in outcomes.get("cache", {}).values())
    lat = outcomes.get("latency_ms", {})
    peak = max((_num(r["Requests/s"]) or 0 for r in history), default=0.0)
    users = max((int(r["User Count"]) for r in history), default=run["scenario"]["users"])
    f: dict[str, Any] = {
        "users": users,
        "duration_s": round(duration),
        "requests": requests,
        "req_s": round(requests / duration, 1) if duration else None,
        "peak_req_s": round(peak, 1),
        "p50": _num(total.get("50%")),
        "p95": _num(total.get("95%")),
        "p99": _num(total.get("99%")),
        "max": _num(total.get("Max Response Time")),
        "errors_pct": round(100 * (server + other) / requests, 3) if requests else None,
        "server_errors": server,
        "shed": shed,
        "shed_pct": round(100 * shed / requests, 2) if requests else None,
        "answered_p50": lat.get("answered", {}).get("p50"),
        "answered_p95": lat.get("answered", {}).get("p95"),
        "answered_p99": lat.get("answered", {}).get("p99"),
        "shed_p99": lat.get("shed", {}).get("p99"),
        "invalid_answers": sum(n for k, n in by_error.items() if "invalid answer" in k),
        "rate_limited_pct": round(100 * limited / requests, 2) if requests else None,
        "hit_rate": round(100 * hits / (hits + misses), 2) if hits + misses else None,
        "hit_p50": lat.get("hit", {}).get("p50"),
        "miss_p50": lat.get("miss", {}).get("p50"),
        "hit_p95": lat.get("hit", {}).get("p95"),
        "miss_p95": lat.get("miss", {}).get("p95"),
        "hits_timed": lat.get("hit", {}).get("count", 0),
        "misses_timed": lat.get("miss", {}).get("count", 0),
        "predictions_answered": hits + misses,
        "failures_by_error": by_error,
    }
    if f["hit_p50"] and f["miss_p50"]:
        f["miss_hit_ratio"] = round(f["miss_p50"] / f["hit_p50"], 1)
    # per endpoint
    endpoints = []
    for name in ENDPOINTS:
        row = stats.get(name)
        if not row:
            continue
        n = int(row["Request Count"])
        cache = outcomes.get("cache", {}).get(name)
        endpoint_429 = sum(v for k, v in by_error.items() if k.startswith(f"{name}: ") and "(429)" in k)
        endpoint_shed = sum(v for k, v in by_error.items() if k.startswith(f"{name}: ") and "shed (503" in k)
        endpoints.append(
            {
                "endpoint": name,
                "requests": n,
                "req_s": round(n / duration, 2) if duration else None,
                "avg": round(_num(row["Average Response Time"]) or 0, 1),
                "p50": _num(row["50%"]),
                "p95": _num(row["95%"]),
                "p99": _num(row["99%"]),
                "rate_limited": endpoint_429,
                "shed": endpoint_shed,
                "other_failures": int(row["Failure Count"]) - endpoint_429 - endpoint_shed,
                "hit_rate": round(100 * cache["hits"] / (cache["hits"] + cache["misses"]), 1)
                if cache and cache["hits"] + cache["misses"]
                else None,
            }
        )
    f["endpoints"] = endpoints
    f["service"] = _service_profile(folder, duration)
    f["resources"] = _resources(folder)
    f["analytics"] = run.get("analytics_summary")
    return f


def _service_profile(folder: Path, duration: float) -> dict[str, Any]:
    """What the service did during the run, from its /metrics before and after."""
    before_text = (folder / "metrics_before.txt").read_text() if (folder / "metrics_before.txt").exists() else ""
    after_text = (folder / "metrics_after.txt").read_text() if (folder / "metrics_after.txt").exists() else ""
    if not after_text:
        return {}
    before, after = metric_totals(before_text), metric_totals(after_text)

    def delta(name: str, **labels: str) -> float:
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    calls = delta("sentiment_inference_seconds_count")
    texts = delta("sentiment_inferred_texts_total")
    seconds = delta("sentiment_inference_seconds_sum")
    hits, misses = (
        delta("sentiment_cache_lookups_total", result="hit"),
        delta("sentiment_cache_lookups_total", result="miss"),
    )
    return {
        "texts_inferred": int(texts),
        "forward_calls": int(calls),
        "mean_batch": round(texts / calls, 2) if calls else None,
        # wall seconds in forward calls per second, summed over workers (CPU waits included)
        "inference_busy": round(seconds / duration, 3) if duration else None,
        "inference_ms_per_call": round(1000 * seconds / calls, 1) if calls else None,
        "cache_hit_rate": round(100 * hits / (hits + misses), 2) if hits + misses else None,
        "rate_limited": int(delta("sentiment_rate_limited_requests_total")),
        "overload_rejections": int(delta("sentiment_overload_rejections_total")),
        "predictions": int(delta("sentiment_predictions_total")),
        "analytics_rows_written": int(delta("sentiment_analytics_rows_total", outcome="written")),
        "analytics_rows_spilled": int(delta("sentiment_analytics_rows_total", outcome="spilled")),
    }


def _resources(folder: Path) -> dict[str, dict[str, float]]:
    rows = _read_csv(folder / "resources.csv")
    out: dict[str, dict[str, float]] = {}
    if not rows:
        return out
    groups = sorted({k.rsplit("_", 1)[0] for k in rows[0] if k.endswith("_cores")})
    for g in groups:
        cores = [_num(r.get(f"{g}_cores")) for r in rows[1:]]
        mem = [_num(r.get(f"{g}_mb")) for r in rows]
        cores_v = [c for c in cores if c is not None]
        mem_v = [m for m in mem if m is not None]
        if not mem_v or max(mem_v) == 0:
            continue
        out[g] = {
            "cores_mean": round(sum(cores_v) / len(cores_v), 2) if cores_v else 0.0,
            "cores_max": round(max(cores_v), 2) if cores_v else 0.0,
            "mb_mean": round(sum(mem_v) / len(mem_v), 1),
            "mb_max": round(max(mem_v), 1),
        }
    redis = [v for r in rows if (v := _num(r.get("redis_used_mb"))) is not None]
    if redis:
        out.setdefault("redis", {})["used_memory_mb_max"] = max(redis)
    return out


# --- judgement -----------------------------------------------------------------------------


def violations(scenario: dict[str, Any], f: dict[str, Any]) -> list[str]:
    """The run's pass/fail thresholds: non-429 errors over 1%, or p95 over the scenario's limit."""
    out = []
    if f["errors_pct"] is None or f["requests"] == 0:
        out.append("no requests were answered")
        return out
    if f["errors_pct"] > 1.0:
        out.append(f"errors other than 429: {f['errors_pct']}% > 1%")
    if f["p95"] is not None and f["p95"] > scenario["p95_limit_ms"]:
        out.append(f"p95 {f['p95']:.0f} ms > limit {scenario['p95_limit_ms']:.0f} ms")
    return out


def target_lines(name: str, f: dict[str, Any]) -> list[str]:
    lines = []
    for key, limit, op in TARGETS.get(name, []):
        value = f.get(key)
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


def analysis(name: str, f: dict[str, Any], machine: dict[str, Any]) -> list[str]:
    lines = target_lines(name, f)
    res, svc = f["resources"], f["service"]
    cpus = machine.get("cpus") or 2
    if res:
        used = sum(g["cores_mean"] for g in res.values())
        parts = ", ".join(
            f"{g} {v['cores_mean']:.2f}" for g, v in sorted(res.items(), key=lambda kv: -kv[1]["cores_mean"])
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
    if svc:
        workers = machine.get("workers")
        busy = svc.get("inference_busy") or 0.0
        share = f" ({100 * busy / workers:.0f}% of the {workers} workers' time)" if workers else ""
        lines.append(
            f"- Model: {svc['texts_inferred']:,} texts inferred in {svc['forward_calls']:,} forward calls"
            f" (mean batch {svc['mean_batch']}, {svc['inference_ms_per_call']} ms of wall time per call); the"
            f" workers spent {busy:.2f} worker-seconds per second in forward calls{share}. A forward call holds"
            " its worker's model thread: texts that miss the cache meanwhile wait for the next batch, so misses"
            " queue as this nears 100%, and batches grow (the worker's in-process batcher, service/batching.py)."
        )
        lines.append(
            f"- Service counters: cache hit rate {svc['cache_hit_rate']}% (per text),"
            f" {svc['rate_limited']:,} rate-limited,"
            f" {svc['overload_rejections']:,} overload rejections, {svc['predictions']:,} predictions,"
            f" {svc['analytics_rows_written']:,} analytics rows written ({svc['analytics_rows_spilled']:,} spilled)."
        )
    if f.get("miss_hit_ratio"):
        lines.append(
            f"- Cache: a miss (p50 {f['miss_p50']:.0f} ms) is {f['miss_hit_ratio']}x a hit"
            f" (p50 {f['hit_p50']:.0f} ms), measured on {f['hits_timed']:,} hits and {f['misses_timed']:,}"
            " misses of single-text requests in this run."
        )
    if f["rate_limited_pct"]:
        lines.append(
            f"- Rate limiting: {f['rate_limited_pct']}% of requests got 429: clients above 100 requests per minute"
            " on /predict and /predict/ab or 20 on /batch (per client, over all workers, in Redis)."
        )
    if f["invalid_answers"]:
        lines.append(f"- **{f['invalid_answers']} answers failed validation** (see the failures table).")
    return lines


# --- plots -----------------------------------------------------------------------------------


def plots(folder: Path, prometheus_url: str | None, run: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = folder / "plots"
    out.mkdir(exist_ok=True)
    made: list[tuple[str, str]] = []
    history = [r for r in _read_csv(folder / "locust_stats_history.csv") if r["Name"] == "Aggregated"]
    if history:
        t0 = float(history[0]["Timestamp"])
        ts = [float(r["Timestamp"]) - t0 for r in history]
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.plot(ts, [_num(r["Requests/s"]) or 0 for r in history], label="requests/s")
        ax.plot(ts, [_num(r["Failures/s"]) or 0 for r in history], label="failures/s (429 included)")
        ax.set_xlabel("seconds")
        ax.set_ylabel("per second")
        ax2 = ax.twinx()
        ax2.plot(ts, [int(r["User Count"]) for r in history], color="grey", linestyle="--", label="users")
        ax2.set_ylabel("users")
        fig.legend(loc="upper left", bbox_to_anchor=(0.08, 0.92))
        ax.set_title("Throughput and users")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=80)
        plt.close(fig)
        made.append(("Throughput and users over time", "plots/throughput.png"))

        fig, ax = plt.subplots(figsize=(10, 4))
        for col in ("50%", "95%", "99%"):
            ax.plot(ts, [_num(r[col]) for r in history], label=f"p{col[:-1]}")
        ax.set_xlabel("seconds")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.set_title("Latency percentiles (Locust's sliding window)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=80)
        plt.close(fig)
        made.append(("Latency percentiles over time", "plots/latency.png"))

    stats = {row["Name"]: row for row in _read_csv(folder / "locust_stats.csv")}
    names = [n for n in ENDPOINTS if n in stats]
    if names:
        fig, ax = plt.subplots(figsize=(10, 4))
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [_num(stats[n]["Average Response Time"]) or 0 for n in names], 0.4, label="mean")
        ax.bar([x + 0.2 for x in xs], [_num(stats[n]["95%"]) or 0 for n in names], 0.4, label="p95")
        ax.set_xticks(list(xs), names)
        ax.set_ylabel("ms")
        ax.set_title("Latency by endpoint")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(out / "endpoints.png", dpi=80)
        plt.close(fig)
        made.append(("Latency by endpoint", "plots/endpoints.png"))

    rows = _read_csv(folder / "resources.csv")
    if len(rows) > 2:
        t0 = float(rows[0]["t"])
        ts = [float(r["t"]) - t0 for r in rows[1:]]
        groups = sorted({k.rsplit("_", 1)[0] for k in rows[0] if k.endswith("_cores")})
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
        for g in groups:
            a1.plot(ts, [_num(r.get(f"{g}_cores")) or 0 for r in rows[1:]], label=g)
            a2.plot(ts, [_num(r.get(f"{g}_mb")) or 0 for r in rows[1:]], label=g)
        a1.set_title("CPU (cores in use)")
        a2.set_title("Memory (PSS, MB)")
        for a in (a1, a2):
            a.set_xlabel("seconds")
            a.grid(alpha=0.3)
            a.legend()
        fig.tight_layout()
        fig.savefig(out / "resources.png", dpi=80)
        plt.close(fig)
        made.append(("CPU and memory by process group", "plots/resources.png"))

    if not prometheus_url and (out / "dashboard.png").exists():  # rendered when the run had its Prometheus
        made.append(("Dashboard panels, from Prometheus' queries of the Grafana dashboard", "plots/dashboard.png"))
    if prometheus_url:
        from loadtests.dashboard import plot_dashboard

        try:
            plot_dashboard(prometheus_url, run["started"], run["ended"] + 10, out / "dashboard.png")
            made.append(("Dashboard panels, from Prometheus' queries of the Grafana dashboard", "plots/dashboard.png"))
        except Exception as exc:  # the report stands without it
            print(f"dashboard plot skipped: {exc}")
    return made


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


def build(folder: Path, prometheus_url: str | None = None) -> dict[str, Any]:
    """Write report.md and plots/ for one scenario folder; return the figures and violations."""
    run = json.loads((folder / "run.json").read_text())
    scenario = run["scenario"]
    name = scenario["name"]
    f = figures(folder)
    bad = violations(scenario, f)
    made = plots(folder, prometheus_url, run)
    original = ORIGINAL.get(name, {})
    when = datetime.fromtimestamp(run["started"], UTC).strftime("%Y-%m-%d %H:%M UTC")
    health = run.get("health") or {}
    models = health.get("model", {})
    lines = [
        f"# Load test: {name}",
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
        "",
        "## Results",
        "",
        "| figure | this run | original | difference |",
        "|---|---|---|---|",
    ]
    for key in (
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
    ):
        o = original.get(key)
        lines.append(f"| {LABELS[key]} | {_fmt(f.get(key))} | {_fmt(o)} | {_diff(f.get(key), o)} |")
    lines += [
        "",
        "Latency is Locust's, measured at the client on the same machine, 429s and sheds included; the",
        "answered rows count only 200s. A shed is a 503 with `Retry-After`: the service refused the request",
        "at once because its texts would have waited longer than the queue-delay budget (MAX_QUEUE_DELAY_MS).",
        "Cache hits and misses are the single-text requests answered `cached: true` and `false`.",
        "",
        "## Per endpoint",
        "",
        "| endpoint | requests | req/s | avg ms | p50 ms | p95 ms | p99 ms | 429 | shed | other failures"
        " | cache hit rate % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in f["endpoints"]:
        lines.append(
            f"| {e['endpoint']} | {_fmt(e['requests'])} | {_fmt(e['req_s'])} | {_fmt(e['avg'])} | {_fmt(e['p50'])} |"
            f" {_fmt(e['p95'])} | {_fmt(e['p99'])} | {_fmt(e['rate_limited'])} | {_fmt(e['shed'])} |"
            f" {_fmt(e['other_failures'])} |"
            f" {_fmt(e['hit_rate'])} |"
        )
    lines += ["", "## Resources", ""]
    if f["resources"]:
        lines += [
            "Sampled every second (CPU as cores in use; memory as PSS, so shared pages count once).",
            "",
            "| process group | CPU mean (cores) | CPU max (cores) | memory mean (MB) | memory max (MB) |",
            "|---|---|---|---|---|",
        ]
        for g, v in sorted(f["resources"].items()):
            if "cores_mean" in v:
                lines.append(
                    f"| {g} | {v['cores_mean']:.2f} | {v['cores_max']:.2f} | {v['mb_mean']:,.0f} | {v['mb_max']:,.0f} |"
                )
        if "used_memory_mb_max" in f["resources"].get("redis", {}):
            lines.append(f"\nRedis `used_memory` peak: {f['resources']['redis']['used_memory_mb_max']:.2f} MB.")
    else:
        lines.append("Not sampled: the service was not started by this run.")
    a = f.get("analytics")
    if a:
        lines += [
            "",
            "## The service's own view (/analytics/summary over the run)",
            "",
            f"{a['total']:,} predictions recorded ({f['predictions_answered']:,} answered to Locust), cache hit rate"
            f" {100 * (a['cache_hit_rate'] or 0):.1f}%, server-side latency p50 {a['latency_ms']['p50']} ms,"
            f" p95 {a['latency_ms']['p95']} ms, p99 {a['latency_ms']['p99']} ms; {a['rate_limited']:,} rate-limited"
            f" and {a['errors']:,} other errors recorded.",
        ]
    lines += ["", "## Analysis", "", *analysis(name, f, run["machine"])]
    if f["failures_by_error"]:
        lines += ["", "## Failures", "", "| endpoint: error | count |", "|---|---|"]
        for k, n in sorted(f["failures_by_error"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {k.replace('|', '/')} | {n:,} |")
    if made:
        lines += ["", "## Plots", ""]
        for title, path in made:
            lines += [f"### {title}", "", f"![{title}]({path})", ""]
    (folder / "report.md").write_text("\n".join(lines).rstrip() + "\n")
    result = {"scenario": name, "figures": f, "violations": bad, "report": str(folder / "report.md")}
    (folder / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def console_summary(result: dict[str, Any]) -> str:
    f = result["figures"]
    verdict = "pass" if not result["violations"] else "FAIL: " + "; ".join(result["violations"])
    return (
        f"[{result['scenario']}] {f['requests']:,} requests, {f['req_s']} req/s, p50 {_fmt(f['p50'])} ms,"
        f" p95 {_fmt(f['p95'])} ms, p99 {_fmt(f['p99'])} ms (answered {_fmt(f['answered_p99'])} ms),"
        f" errors {f['errors_pct']}% (+{f['rate_limited_pct']}% 429, {f['shed_pct']}% shed),"
        f" cache hits {f['hit_rate']}%: {verdict}\n  report: {result['report']}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prometheus", default=None, help="re-render the dashboard plot from this Prometheus")
    args = parser.parse_args()
    print(console_summary(build(args.folder, args.prometheus)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
