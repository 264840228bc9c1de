"""The capacity steps as a Locust LoadTestShape (loaded beside locustfile.py only for the
`steps` scenario; a shape class in a locustfile takes over the run): each share of STEP_USERS
users (the capacity, in the original's users: each sends about one request a second) held for
STEP_S seconds, in the order STEP_SHARES gives. loadtests/steps.py reads the outcome.
"""

from __future__ import annotations

import os

from locust import LoadTestShape


def shares(text: str) -> list[float]:
    return [float(s) for s in text.split(",") if s.strip()]


class StepShape(LoadTestShape):
    users = int(os.environ.get("STEP_USERS", "400"))
    step_seconds = float(os.environ.get("STEP_S", "90"))
    step_shares = shares(os.environ.get("STEP_SHARES", "0.25,0.5,0.75,1.0,1.25"))

    def tick(self) -> tuple[int, float] | None:
        step = int(self.get_run_time() // self.step_seconds)
        if step >= len(self.step_shares):
            return None
        # Spawned within about 5 s of the step's start, well inside the settling time.
        return max(1, round(self.users * self.step_shares[step])), max(1.0, self.users / 5)
