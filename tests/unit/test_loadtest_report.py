"""The load-test report's judgement: thresholds and targets, on figures given here."""

from __future__ import annotations

import pytest

from loadtests.bench.__main__ import median_case
from loadtests.report.figures import endpoint_names, failures, steps_table
from loadtests.report.markdown import target_lines, violations, write_steps
from loadtests.run import PLAN, QUICK, parse_duration


def _figures(**kw):
    base = {"requests": 1000, "errors_pct": 0.0, "p50": 40.0, "p95": 100.0, "p99": 200.0}
    return {**base, **kw}


def test_thresholds_fail_on_errors_other_than_429_and_on_p95() -> None:
    scenario = {"p95_limit_ms": 120}
    assert violations(scenario, _figures()) == []
    assert violations(scenario, _figures(errors_pct=1.5)) == ["errors other than 429: 1.5% > 1%"]
    assert violations(scenario, _figures(p95=130.0)) == ["p95 130 ms > limit 120 ms"]
    assert violations(scenario, _figures(requests=0, errors_pct=None)) == ["no requests were answered"]


def test_targets_say_by_how_much_they_are_missed() -> None:
    lines = target_lines("baseline", _figures(p50=25.0, p95=50.0))
    assert lines[0] == "- p50 latency (ms): **25**, target <= 20: **missed by 5 (+25%)**"
    assert lines[1].endswith("target <= 60: met")
    cache = target_lines("cache", {"hit_rate": 97.5, "hit_p50": None})
    assert cache == [
        "- cache hit rate (%): **97.5**, target >= 95: met",
        "- cache hits: p50 (ms): no data (target <= 3)",
    ]
    spike = target_lines("spike", {"server_errors": 0, "answered_p99": 300.0, "max": 1200.0, "shed_pct": 4.0})
    assert spike[1].endswith("target <= 350: met") and "missed by 200" in spike[2]


def test_failures_tell_rate_limits_and_sheds_from_errors() -> None:
    rows = [
        {"Name": "/predict", "Error": "rate limited (429)", "Occurrences": "7"},
        {"Name": "/predict", "Error": "shed (503, Retry-After)", "Occurrences": "5"},
        {"Name": "/batch", "Error": "HTTP 503: no Retry-After", "Occurrences": "2"},
        {"Name": "/predict", "Error": "HTTP 500: boom", "Occurrences": "1"},
        {"Name": "/health", "Error": "invalid answer: status 'x'", "Occurrences": "3"},
    ]
    limited, shed, server, other, by_error = failures(rows)
    assert (limited, shed, server, other) == (7, 5, 3, 3)
    assert by_error["/predict: shed (503, Retry-After)"] == 5


def test_plan_matches_the_original_and_quick_is_about_two_minutes() -> None:
    assert (PLAN["baseline"].users, PLAN["baseline"].spawn_rate, PLAN["baseline"].duration_s) == (100, 10, 600)
    assert (PLAN["spike"].users, PLAN["spike"].ramp_s, PLAN["spike"].hold_s) == (500, 120, 300)
    assert (PLAN["cache"].users, PLAN["cache"].duration_s, PLAN["cache"].repeat_share) == (50, 300, 1.0)
    assert 90 <= sum(s.duration_s for s in QUICK.values()) <= 150
    assert parse_duration("10m") == 600 and parse_duration("90s") == 90 and parse_duration("45") == 45


def test_endpoints_are_the_request_names_locust_recorded_in_its_order() -> None:
    stats = {name: {} for name in ("/analytics/ab", "/batch", "/predict", "Aggregated", "/new")}
    assert endpoint_names(stats) == ["/analytics/ab", "/batch", "/predict", "/new"]


def test_bench_takes_the_median_of_each_figure_over_its_rounds() -> None:
    rounds = [
        {"req_per_s": r, "cpu_ms_per_request": c, "model_cpu_ms_per_request": m, "mean_batch": b}
        | {"failures": 0, "requests": 100}
        for r, c, m, b in [(441.8, 4.36, 3.58, 7.3), (415.4, 4.68, 3.84, 6.2), (437.6, 4.44, 3.63, 7.7)]
    ]
    median = median_case(rounds)
    assert (median["req_per_s"], median["cpu_ms_per_request"]) == (437.6, 4.44)
    assert (median["model_cpu_ms_per_request"], median["mean_batch"]) == (3.63, 7.3)
    assert (median["requests"], median["rounds"]) == (300, 3)


def test_the_steps_table_reads_each_step_past_its_settling_time(tmp_path) -> None:
    start = 1_000.0
    lines = [f"start,{start},"]
    # Step 0 (0-100 s): 2 answered a second at 10 ms, and a shed in its settling time only.
    # Step 1 (100-200 s): 4 a second at 30 ms, one in four shed.
    lines.append(f"{start + 5},shed,1.0")
    for s in range(200):
        for k in range(2 if s < 100 else 4):
            kind = "shed" if s >= 100 and k == 3 else "answered"
            lines.append(f"{start + s + k / 4:.2f},{kind},{10.0 if s < 100 else 30.0}")
    (tmp_path / "timeline.csv").write_text("\n".join(lines) + "\n")
    samples = ["t,api_cores,saturation_in_flight,saturation_queue_delay"]
    samples += [
        f"{start + s},{0.5 if s < 100 else 1.5},{0.1 if s < 100 else 0.9},{0.05 if s < 100 else 0.7}"
        for s in range(200)
    ]
    (tmp_path / "resources.csv").write_text("\n".join(samples) + "\n")
    rows = steps_table(tmp_path, users=40, step_s=100, step_shares=[0.5, 1.0])
    assert [r["users"] for r in rows] == [20, 40]
    assert [r["answered_req_s"] for r in rows] == [2.0, 3.0]
    assert [r["p95_ms"] for r in rows] == [10.0, 30.0]
    assert [r["shed_pct"] for r in rows] == [0.0, 25.0]  # the first step's shed was in its settling time
    assert rows[1]["saturation_queue_delay"] == pytest.approx(0.7) and rows[0]["api_cores"] == pytest.approx(0.5)
    assert "| 100% | 40 | 3.0 |" in write_steps(tmp_path, rows)
    short = steps_table(tmp_path, users=40, step_s=20, step_shares=[0.5])  # the quick profile's steps
    assert short[0]["answered_req_s"] == 2.0  # its last 15 s


def test_the_bench_chart_is_drawn_from_the_result_of_a_run(tmp_path) -> None:
    from loadtests.report.plots import bench_chart

    cases = [
        {"server": server, "mode": mode, "users": users, "req_per_s": rate, "p95_ms": p95}
        for server, mode, users, rate, p95 in [
            ("service", "unique", 8, 300.0, 40.0),
            ("service", "unique", 32, 440.0, 100.0),
            ("service", "repeated", 32, 3000.0, 12.0),
            ("litserve", "unique", 8, 280.0, 45.0),
            ("litserve", "unique", 32, 400.0, 110.0),
            ("naive", "unique", 8, 90.0, 120.0),
            ("naive", "unique", 32, 95.0, 400.0),
        ]
    ]
    path = bench_chart({"model": "m:1", "cases": cases, "settings": {"rounds": 3, "seconds": 30}}, tmp_path / "b.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_are_summed_over_the_labels_asked_for() -> None:
    from loadtests.harness import metric_sum, parse_metrics, percentile

    text = (
        "# TYPE sentiment_cache_lookups_total counter\n"
        'sentiment_cache_lookups_total{result="hit"} 3.0\n'
        'sentiment_cache_lookups_total{result="miss"} 2.0\n'
    )
    samples = parse_metrics(text)
    assert metric_sum(samples, "sentiment_cache_lookups_total") == 5.0
    assert metric_sum(samples, "sentiment_cache_lookups_total", result="hit") == 3.0
    assert (percentile([5, 1, 4, 2, 3], 0.5), percentile([], 0.95)) == (3, None)
