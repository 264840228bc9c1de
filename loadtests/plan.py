"""The load-test plan: the original deployment's scenarios and figures, and this project's limits.

`PLAN` is the original plan at full scale and `QUICK` the same mix at a small scale (for CI);
`ORIGINAL` holds the original report's figures the reports compare against, and `TARGETS` the
figures this project aims for on 2 cores. loadtests/run.py runs the scenarios and
loadtests/report.py judges them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Scenario:
    name: str
    users: int
    spawn_rate: float
    duration_s: float
    repeat_share: float
    repeat_pool: int = 200
    shape: str = ""  # a LoadTestShape drives users and duration: "spike" (shapes.py) or "steps" (step_shape.py)
    ramp_s: float = 0
    hold_s: float = 0
    step_s: float = 0  # steps: seconds at each share of `users`
    step_shares: tuple[float, ...] = ()
    p95_limit_ms: float = 120.0
    description: str = ""


# The original plan. p95 limits: baseline's target on 2 cores, and the original's own p95 elsewhere.
PLAN = {
    "baseline": Scenario(
        "baseline", 100, 10, 600, 0.72, p95_limit_ms=60, description="100 users, spawn 10/s, 10 minutes"
    ),
    "spike": Scenario(
        "spike",
        500,
        0,
        420,
        0.72,
        shape="spike",
        ramp_s=120,
        hold_s=300,
        p95_limit_ms=140,
        description="0 to 500 users over 2 minutes, 500 held for 5 minutes",
    ),
    "cache": Scenario(
        "cache",
        50,
        10,
        300,
        1.0,
        repeat_pool=100,
        p95_limit_ms=120,
        description="50 users, 5 minutes, only repeated texts",
    ),
}
# About two minutes for all three: the same mix at a small scale, for CI.
QUICK = {
    "baseline": replace(PLAN["baseline"], users=20, spawn_rate=10, duration_s=40, description="quick: 20 users, 40 s"),
    "spike": replace(
        PLAN["spike"], users=60, duration_s=40, ramp_s=15, hold_s=25, description="quick: 0 to 60 users in 15 s, 25 s"
    ),
    "cache": replace(PLAN["cache"], users=10, duration_s=30, repeat_pool=20, description="quick: 10 users, 30 s"),
}

# Beyond the original plan: one replica's saturation at fixed shares of its capacity, for the
# autoscaler's target (docs/scaling.md). 400 users of the original's traffic (about 400
# requests a second, 72% of texts repeated) are 100%: the spike sheds beyond that.
STEPS = Scenario(
    "steps",
    400,
    0,
    6 * 90,
    0.72,
    shape="steps",
    step_s=90,
    # 87.5%: between the last step without sheds and the first with, where the target lies.
    step_shares=(0.25, 0.5, 0.75, 0.875, 1.0, 1.25),
    p95_limit_ms=float("inf"),  # the last step is meant to overload it
    description="25, 50, 75, 87.5, 100 and 125% of 400 users, 90 s each",
)
QUICK_STEPS = replace(STEPS, users=40, duration_s=6 * 20, step_s=20, description="quick: 10 to 50 users, 20 s each")

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
