"""The spike of the original plan as a Locust LoadTestShape: 0 to 500 users over 2 minutes, then
500 held for 5 minutes. Loaded beside locustfile.py only for the spike scenario (a shape class
in a locustfile takes over the run). SPIKE_USERS, SPIKE_RAMP_S and SPIKE_HOLD_S scale it (the
quick profile does).
"""

from __future__ import annotations

import math
import os

from locust import LoadTestShape


class SpikeShape(LoadTestShape):
    peak_users = int(os.environ.get("SPIKE_USERS", "500"))
    ramp_seconds = float(os.environ.get("SPIKE_RAMP_S", "120"))
    hold_seconds = float(os.environ.get("SPIKE_HOLD_S", "300"))

    def tick(self) -> tuple[int, float] | None:
        t = self.get_run_time()
        # Twice the mean ramp rate, so the spawner keeps up with the target line.
        rate = max(1.0, 2 * self.peak_users / max(self.ramp_seconds, 1.0))
        if t < self.ramp_seconds:
            return max(1, math.ceil(self.peak_users * t / self.ramp_seconds)), rate
        if t < self.ramp_seconds + self.hold_seconds:
            return self.peak_users, rate
        return None
