"""The original deployment's traffic for Locust: `make loadtest` runs it (loadtests/run.py).

Each user is one client with its own address (`X-Forwarded-For` from the 198.18.0.0/15
benchmarking range; the service must list the load generator in TRUSTED_PROXIES), waits 0.5-1.5 s
between requests like the original's users, and sends 70% `/predict`, 20% `/predict/ab` and
10% `/batch`, `/analytics/*` and `/health`. Every answer is checked: status, fields and values,
not only the status. A 429 is reported as the failure "rate limited (429)" and a 503 that carries
`Retry-After` as "shed (503, Retry-After)", so the report can tell rate limiting and load
shedding from errors (a 503 without `Retry-After` is an error).

Texts come from the held-out validation corpus (var/data, written by the model build) or a
built-in list. With probability --repeat-share a request sends one of the first --repeat-pool
texts (a cache hit after its first use); otherwise a text never sent before.

Options, on the command line or as environment variables (LOCUST_REPEAT_SHARE, ...):
  --repeat-share 0.72   --repeat-pool 200   --outcomes FILE (cache hit/miss latencies as JSON)
  --timeline FILE (each answered and shed request's time, kind and latency as CSV, after a line
  with the test's start time: the capacity steps read it, loadtests/steps.py)
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from locust import FastHttpUser, between, events, task

from loadtests.texts import CORPUS, load_texts

TEXTS_FILE = Path(os.environ.get("LOADTEST_TEXTS", CORPUS))
LABELS = {"positive", "negative"}


TEXTS = load_texts(TEXTS_FILE, 500)
_addresses = itertools.count(1)
_salt = uuid.uuid4().hex[:8]


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--repeat-share", type=float, default=0.72, env_var="LOCUST_REPEAT_SHARE")
    parser.add_argument("--repeat-pool", type=int, default=200, env_var="LOCUST_REPEAT_POOL")
    parser.add_argument("--outcomes", default="", env_var="LOCUST_OUTCOMES", help="write cache outcomes here")
    parser.add_argument("--timeline", default="", env_var="LOCUST_TIMELINE", help="write the requests' timeline here")
    parser.add_argument("--admin-key", default="", env_var="LOCUST_ADMIN_KEY", help="ADMIN_API_KEY of the service")


class Outcomes:
    """Per endpoint: predictions answered from the cache or not; the request times of the
    single-text requests of each kind, and of every answered (200) request and every shed one
    (Locust's own statistics split neither on the cache nor on failures)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cached: dict[str, list[int]] = {}  # endpoint -> [from cache, inferred]
        self.times: dict[str, list[float]] = {"hit": [], "miss": [], "answered": [], "shed": []}
        self.timeline: list[tuple[float, str, float]] | None = None  # with --timeline: (time, kind, ms)
        self.started = 0.0

    def timed(self, kind: str, ms: float) -> None:
        with self.lock:
            self.times[kind].append(ms)
            if self.timeline is not None:
                self.timeline.append((time.time(), kind, ms))

    def add(self, endpoint: str, cached: int, total: int, single_ms: float | None = None) -> None:
        with self.lock:
            c = self.cached.setdefault(endpoint, [0, 0])
            c[0] += cached
            c[1] += total - cached
            if single_ms is not None:
                self.times["hit" if cached else "miss"].append(single_ms)

    def summary(self) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            s = sorted(values)
            return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]

        with self.lock:
            return {
                "cache": {e: {"hits": h, "misses": m} for e, (h, m) in self.cached.items()},
                "latency_ms": {
                    kind: {
                        "count": len(v),
                        "p50": pct(v, 0.5),
                        "p95": pct(v, 0.95),
                        "p99": pct(v, 0.99),
                        "max": max(v, default=None),
                    }
                    for kind, v in self.times.items()
                },
            }


OUTCOMES = Outcomes()


@events.test_start.add_listener
def _start_timeline(environment: Any, **_: Any) -> None:
    OUTCOMES.started = time.time()
    if environment.parsed_options and environment.parsed_options.timeline:
        OUTCOMES.timeline = []


@events.request.add_listener
def _time_outcome(response_time: float, response: Any = None, exception: Any = None, **_: Any) -> None:
    status = getattr(response, "status_code", None)
    if exception is None and status == 200:
        OUTCOMES.timed("answered", response_time)
    elif status == 503 and response.headers.get("Retry-After"):
        OUTCOMES.timed("shed", response_time)


@events.quitting.add_listener
def _write_outcomes(environment: Any, **_: Any) -> None:
    path = environment.parsed_options.outcomes if environment.parsed_options else ""
    if path:
        Path(path).write_text(json.dumps(OUTCOMES.summary(), indent=2))
    timeline = environment.parsed_options.timeline if environment.parsed_options else ""
    if timeline and OUTCOMES.timeline is not None:
        with Path(timeline).open("w") as f:
            f.write(f"start,{OUTCOMES.started:.3f},\n")
            f.writelines(f"{t:.3f},{kind},{ms:.1f}\n" for t, kind, ms in OUTCOMES.timeline)


def _check_prediction(p: Any) -> str | None:
    """What is wrong with a Prediction of the contract, or None."""
    if not isinstance(p, dict):
        return "prediction is not an object"
    if p.get("label") not in LABELS:
        return f"label {p.get('label')!r}"
    score, probs = p.get("score"), p.get("probabilities") or {}
    if not isinstance(score, float) or not 0.5 <= score <= 1.0:
        return f"score {score!r}"
    if set(probs) != LABELS or abs(sum(probs.values()) - 1.0) > 1e-3 or abs(probs[p["label"]] - score) > 1e-6:
        return f"probabilities {probs!r}"
    if not isinstance(p.get("cached"), bool) or not p.get("model") or not p.get("request_id"):
        return "cached, model or request_id missing"
    return None


class SentimentUser(FastHttpUser):
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        n = next(_addresses)
        self.headers = {"X-Forwarded-For": f"198.18.{(n >> 8) & 255}.{n & 255}"}
        options = self.environment.parsed_options
        if options is not None and options.admin_key:
            self.headers["Authorization"] = f"Bearer {options.admin_key}"
        self.repeat_share = options.repeat_share if options is not None else 0.72
        self.repeat_pool = min(options.repeat_pool if options is not None else 200, len(TEXTS))
        self.rng = random.Random()

    def _text(self) -> str:
        if self.rng.random() < self.repeat_share:
            return TEXTS[self.rng.randrange(self.repeat_pool)]
        # A text never sent before: a real review with a marker the cache cannot have seen.
        return f"{self.rng.choice(TEXTS)} ({_salt}-{uuid.uuid4().hex[:12]})"

    def _fail(self, r: Any) -> None:
        if r.status_code == 429:
            r.failure("rate limited (429)")
        elif r.status_code == 503 and r.headers.get("Retry-After"):
            r.failure("shed (503, Retry-After)")
        else:
            r.failure(f"HTTP {r.status_code}: {(r.text or '')[:120]}")

    def _predict(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        with self.client.post(path, json=body, headers=self.headers, catch_response=True, name=path) as r:
            if r.status_code != 200:
                self._fail(r)
                return None
            data = r.json()
            problem = _check_prediction(data)
            if problem is None and path == "/predict/ab" and data.get("variant") not in ("A", "B"):
                problem = f"variant {data.get('variant')!r}"
            if problem:
                r.failure(f"invalid answer: {problem}")
                return None
            OUTCOMES.add(path, int(data["cached"]), 1, r.request_meta["response_time"])
            return data

    @task(70)
    def predict(self) -> None:
        self._predict("/predict", {"text": self._text()})

    @task(20)
    def predict_ab(self) -> None:
        user = f"user-{self.headers['X-Forwarded-For']}"
        self._predict("/predict/ab", {"text": self._text(), "user_id": user})

    @task(4)
    def batch(self) -> None:
        texts = [self._text() for _ in range(self.rng.randint(2, 8))]
        with self.client.post(
            "/batch", json={"texts": texts}, headers=self.headers, catch_response=True, name="/batch"
        ) as r:
            if r.status_code != 200:
                self._fail(r)
                return
            data = r.json()
            preds = data.get("predictions") or []
            problems = [p for p in map(_check_prediction, preds) if p]
            if len(preds) != len(texts) or data.get("count") != len(texts) or problems:
                r.failure(f"invalid answer: {len(preds)} predictions for {len(texts)} texts {problems[:1]}")
                return
            OUTCOMES.add("/batch", int(data["cached_count"]), len(texts))

    @task(3)
    def analytics(self) -> None:
        path = self.rng.choice(["/analytics/summary", "/analytics/ab"])
        with self.client.get(path, params={"window": "5m"}, headers=self.headers, catch_response=True, name=path) as r:
            if r.status_code != 200:
                self._fail(r)
                return
            data = r.json()
            if ("total" not in data) if path.endswith("summary") else ("variants" not in data):
                r.failure(f"invalid answer: {sorted(data)[:6]}")

    @task(3)
    def health(self) -> None:
        with self.client.get("/health", catch_response=True, name="/health") as r:
            if r.status_code != 200:
                self._fail(r)
            elif r.json().get("status") not in ("ok", "degraded"):
                r.failure(f"invalid answer: status {r.json().get('status')!r}")
