"""The load-test report's judgement: thresholds and targets, on figures given here."""

from __future__ import annotations

from loadtests.bench import median_case
from loadtests.figures import _failures, endpoint_names
from loadtests.plan import PLAN, QUICK
from loadtests.report import target_lines, violations
from loadtests.run import parse_duration


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
    limited, shed, server, other, by_error = _failures(rows)
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
