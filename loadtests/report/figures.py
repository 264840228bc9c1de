"""The figures of one load-test run, read from the files loadtests/run.py leaves in its folder.

Locust's CSV files (locust_stats.csv, locust_stats_history.csv, locust_failures.csv), outcomes.json
(cache hits and their latencies, from the locustfile), the service's /metrics before and after,
run.json (the scenario, the machine, /analytics/summary after) and resources.csv (CPU and memory
per process group). markdown.py writes them up and plots.py draws them.

The capacity steps (`make loadtest SCENARIO=steps`; the table in docs/scaling.md, from which the
autoscaler's target comes, is their output): `steps_table` reads the requests' timeline
(the locustfile's --timeline) and the saturation sampled from /metrics every second
(resources.csv), over each step but its first SETTLE_S seconds.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from loadtests.harness import metric_sum, parse_metrics, percentile

AGGREGATED = "Aggregated"  # the name of Locust's row over all requests

# --- inputs ------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def number(value: Any) -> float | None:
    """The value as a float; None for a missing or non-numeric value, or NaN."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def locust_stats(folder: Path) -> dict[str, dict[str, str]]:
    """Locust's final statistics by request name, in the order Locust wrote them."""
    return {row["Name"]: row for row in read_csv(folder / "locust_stats.csv")}


def endpoint_names(stats: dict[str, dict[str, str]]) -> list[str]:
    """The request names Locust recorded: every row of its statistics but the aggregated one."""
    return [name for name in stats if name != AGGREGATED]


def aggregated_history(folder: Path) -> list[dict[str, str]]:
    """Locust's history rows over all requests, one per sample."""
    return [r for r in read_csv(folder / "locust_stats_history.csv") if r["Name"] == AGGREGATED]


def resource_groups(rows: list[dict[str, str]]) -> list[str]:
    """The process groups sampled in resources.csv, sorted."""
    return sorted({k.rsplit("_", 1)[0] for k in rows[0] if k.endswith("_cores")})


# --- figures -------------------------------------------------------------------------------


def failures(rows: list[dict[str, str]]) -> tuple[int, int, int, int, dict[str, int]]:
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
    """The run's figures: totals, latencies, failures, cache, per endpoint, service and resources."""
    run = json.loads((folder / "run.json").read_text())
    stats = locust_stats(folder)
    total = stats.get(AGGREGATED, {})
    history = aggregated_history(folder)
    limited, shed, server, other, by_error = failures(read_csv(folder / "locust_failures.csv"))
    outcomes = json.loads((folder / "outcomes.json").read_text()) if (folder / "outcomes.json").exists() else {}
    requests = int(total.get("Request Count", 0) or 0)
    duration = run["ended"] - run["started"]
    hits = sum(c["hits"] for c in outcomes.get("cache", {}).values())
    misses = sum(c["misses"] for c in outcomes.get("cache", {}).values())
    latency = outcomes.get("latency_ms", {})
    peak = max((number(r["Requests/s"]) or 0 for r in history), default=0.0)
    users = max((int(r["User Count"]) for r in history), default=run["scenario"]["users"])
    figs: dict[str, Any] = {
        "users": users,
        "duration_s": round(duration),
        "requests": requests,
        "req_s": round(requests / duration, 1) if duration else None,
        "peak_req_s": round(peak, 1),
        "p50": number(total.get("50%")),
        "p95": number(total.get("95%")),
        "p99": number(total.get("99%")),
        "max": number(total.get("Max Response Time")),
        "errors_pct": round(100 * (server + other) / requests, 3) if requests else None,
        "server_errors": server,
        "shed": shed,
        "shed_pct": round(100 * shed / requests, 2) if requests else None,
        "answered_p50": latency.get("answered", {}).get("p50"),
        "answered_p95": latency.get("answered", {}).get("p95"),
        "answered_p99": latency.get("answered", {}).get("p99"),
        "shed_p99": latency.get("shed", {}).get("p99"),
        "invalid_answers": sum(n for k, n in by_error.items() if "invalid answer" in k),
        "rate_limited_pct": round(100 * limited / requests, 2) if requests else None,
        "hit_rate": round(100 * hits / (hits + misses), 2) if hits + misses else None,
        "hit_p50": latency.get("hit", {}).get("p50"),
        "miss_p50": latency.get("miss", {}).get("p50"),
        "hit_p95": latency.get("hit", {}).get("p95"),
        "miss_p95": latency.get("miss", {}).get("p95"),
        "hits_timed": latency.get("hit", {}).get("count", 0),
        "misses_timed": latency.get("miss", {}).get("count", 0),
        "predictions_answered": hits + misses,
        "failures_by_error": by_error,
    }
    if figs["hit_p50"] and figs["miss_p50"]:
        figs["miss_hit_ratio"] = round(figs["miss_p50"] / figs["hit_p50"], 1)
    figs["endpoints"] = _endpoints(stats, outcomes.get("cache", {}), by_error, duration)
    figs["service"] = _service_profile(folder, duration)
    figs["resources"] = _resources(folder)
    figs["analytics"] = run.get("analytics_summary")
    return figs


def _endpoints(
    stats: dict[str, dict[str, str]], cache: dict[str, dict[str, int]], by_error: dict[str, int], duration: float
) -> list[dict[str, Any]]:
    """One row per request name Locust recorded, in its order."""
    rows = []
    for name in endpoint_names(stats):
        row = stats[name]
        n = int(row["Request Count"])
        outcome = cache.get(name)
        endpoint_429 = sum(v for k, v in by_error.items() if k.startswith(f"{name}: ") and "(429)" in k)
        endpoint_shed = sum(v for k, v in by_error.items() if k.startswith(f"{name}: ") and "shed (503" in k)
        rows.append(
            {
                "endpoint": name,
                "requests": n,
                "req_s": round(n / duration, 2) if duration else None,
                "avg": round(number(row["Average Response Time"]) or 0, 1),
                "p50": number(row["50%"]),
                "p95": number(row["95%"]),
                "p99": number(row["99%"]),
                "rate_limited": endpoint_429,
                "shed": endpoint_shed,
                "other_failures": int(row["Failure Count"]) - endpoint_429 - endpoint_shed,
                "hit_rate": round(100 * outcome["hits"] / (outcome["hits"] + outcome["misses"]), 1)
                if outcome and outcome["hits"] + outcome["misses"]
                else None,
            }
        )
    return rows


def _service_profile(folder: Path, duration: float) -> dict[str, Any]:
    """What the service did during the run, from its /metrics before and after."""
    before_text = (folder / "metrics_before.txt").read_text() if (folder / "metrics_before.txt").exists() else ""
    after_text = (folder / "metrics_after.txt").read_text() if (folder / "metrics_after.txt").exists() else ""
    if not after_text:
        return {}
    before, after = parse_metrics(before_text), parse_metrics(after_text)

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

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
        "analytics_rows_dropped": int(delta("sentiment_analytics_rows_total", outcome="dropped")),
    }


def _resources(folder: Path) -> dict[str, dict[str, float]]:
    """CPU (cores) and memory (MB) per process group, mean and max; Redis' peak used memory."""
    rows = read_csv(folder / "resources.csv")
    out: dict[str, dict[str, float]] = {}
    if not rows:
        return out
    for group in resource_groups(rows):
        cores = [number(r.get(f"{group}_cores")) for r in rows[1:]]
        mem = [number(r.get(f"{group}_mb")) for r in rows]
        cores_v = [c for c in cores if c is not None]
        mem_v = [m for m in mem if m is not None]
        if not mem_v or max(mem_v) == 0:
            continue
        out[group] = {
            "cores_mean": round(sum(cores_v) / len(cores_v), 2) if cores_v else 0.0,
            "cores_max": round(max(cores_v), 2) if cores_v else 0.0,
            "mb_mean": round(sum(mem_v) / len(mem_v), 1),
            "mb_max": round(max(mem_v), 1),
        }
    redis = [v for r in rows if (v := number(r.get("redis_used_mb"))) is not None]
    if redis:
        out.setdefault("redis", {})["used_memory_mb_max"] = max(redis)
    return out


# --- the capacity steps --------------------------------------------------------------------

SETTLE_S = 20.0  # of each step (a quarter of a shorter one), left out: users spawning, the adaptive limit moving


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def steps_table(folder: Path, users: int, step_s: float, step_shares: list[float]) -> list[dict[str, Any]]:
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
                "p50_ms": percentile(answered, 0.5),
                "p95_ms": percentile(answered, 0.95),
                "shed_pct": round(100 * shed / max(1, len(answered) + shed), 2),
                "saturation_in_flight": mean_of("saturation_in_flight"),
                "saturation_queue_delay": mean_of("saturation_queue_delay"),
                "api_cores": mean_of("api_cores"),
            }
        )
    return result
