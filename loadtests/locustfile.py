"""Every suite's traffic for Locust, a User class each; the launcher (loadtests/harness.py) names
the class a run uses.

`SentimentUser`, the original deployment's traffic (`make loadtest`, loadtests/run.py): each user
is one client with its own address (`X-Forwarded-For` from the 198.18.0.0/15 benchmarking range;
the service must list the load generator in TRUSTED_PROXIES), waits 0.5-1.5 s between requests
like the original's users, and sends 70% `/predict`, 20% `/predict/ab` and 10% `/batch`,
`/analytics/*` and `/health`. Every answer is checked: status, fields and values, not only the
status. A 429 is reported as the failure "rate limited (429)" and a 503 that carries
`Retry-After` as "shed (503, Retry-After)", so the report can tell rate limiting and load
shedding from errors (a 503 without `Retry-After` is an error). With probability --repeat-share
a request sends one of the first --repeat-pool texts (a cache hit after its first use);
otherwise a text never sent before. The spike and the capacity steps drive its users through
`PlanShape` (LOADTEST_SHAPE=spike or steps; SPIKE_USERS, SPIKE_RAMP_S, SPIKE_HOLD_S, STEP_USERS,
STEP_S and STEP_SHARES scale them), defined only then: a shape class takes over the run.

`ChaosUser`, the chaos run's traffic (`make chaos`): 70% /predict, 20% /predict/ab, 10% /batch
(2 to 8 texts), a quarter of the texts from a pool of 100 that repeats; every request one JSON
line in the file --records names (`_record`; loadtests/chaos/faults.py reads them).

`PredictUser`, the bench's closed-loop /predict load (`make bench`): each user sends its next
request on reply; BENCH_MODE=unique gives every request a text never sent before (no cache hits),
BENCH_MODE=repeated cycles through a few texts (all cache hits after the first round).

Texts come from the held-out validation corpus (var/data, written by the model build) or a
built-in list. Options, on the command line or as environment variables (LOCUST_REPEAT_SHARE, ...):
  --repeat-share 0.72   --repeat-pool 200   --outcomes FILE (cache hit/miss latencies as JSON)
  --timeline FILE (each answered and shed request's time, kind and latency as CSV, after a line
  with the test's start time: the capacity steps read it, loadtests/report/figures.py)
  --records FILE (the chaos run's records)
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
from typing import IO, Any

from locust import FastHttpUser, LoadTestShape, between, constant, events, task

from loadtests.harness import CORPUS, load_texts, percentile

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
    parser.add_argument("--records", default="", env_var="CHAOS_RECORDS", help="write one JSON line per request here")


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
        self.active = False  # with --outcomes: the other classes' runs keep nothing

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
        with self.lock:
            return {
                "cache": {e: {"hits": h, "misses": m} for e, (h, m) in self.cached.items()},
                "latency_ms": {
                    kind: {
                        "count": len(v),
                        "p50": percentile(v, 0.5),
                        "p95": percentile(v, 0.95),
                        "p99": percentile(v, 0.99),
                        "max": max(v, default=None),
                    }
                    for kind, v in self.times.items()
                },
            }


OUTCOMES = Outcomes()


@events.test_start.add_listener
def _start_timeline(environment: Any, **_: Any) -> None:
    OUTCOMES.started = time.time()
    OUTCOMES.active = bool(environment.parsed_options and environment.parsed_options.outcomes)
    if environment.parsed_options and environment.parsed_options.timeline:
        OUTCOMES.timeline = []


@events.request.add_listener
def _time_outcome(response_time: float, response: Any = None, exception: Any = None, **_: Any) -> None:
    if not OUTCOMES.active:
        return
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


# --- the spike and the capacity steps ------------------------------------------------------

SPIKE = (("SPIKE_USERS", "500"), ("SPIKE_RAMP_S", "120"), ("SPIKE_HOLD_S", "300"))


if SHAPE := os.environ.get("LOADTEST_SHAPE", ""):

    class PlanShape(LoadTestShape):
        """The spike: 0 to SPIKE_USERS users over SPIKE_RAMP_S, held SPIKE_HOLD_S (the original's
        500, 2 and 5 minutes); or the steps: each of STEP_SHARES of STEP_USERS held STEP_S seconds."""

        peak, ramp_s, hold_s = (float(os.environ.get(k, d)) for k, d in SPIKE)
        users, step_s = int(os.environ.get("STEP_USERS", "400")), float(os.environ.get("STEP_S", "90"))
        shares = [float(x) for x in os.environ.get("STEP_SHARES", "0.25,0.5,0.75,1.0,1.25").split(",") if x.strip()]

        def tick(self) -> tuple[int, float] | None:
            t = self.get_run_time()
            if SHAPE == "steps":
                step = int(t // self.step_s)
                # Spawned within about 5 s of the step's start, well inside the settling time.
                done = step >= len(self.shares)
                return None if done else (max(1, round(self.users * self.shares[step])), max(1.0, self.users / 5))
            # Twice the mean ramp rate, so the spawner keeps up with the target line.
            rate = max(1.0, 2 * self.peak / max(self.ramp_s, 1.0))
            if t < self.ramp_s:
                return max(1, math.ceil(self.peak * t / self.ramp_s)), rate
            return (int(self.peak), rate) if t < self.ramp_s + self.hold_s else None


# --- the chaos run -------------------------------------------------------------------------

CHAOS_REPEAT_SHARE = 0.25
CHAOS_REPEAT_POOL = min(100, len(TEXTS))
_records: list[IO[str]] = []


@events.init.add_listener
def _open_records(environment: Any, **_: Any) -> None:
    path = environment.parsed_options.records if environment.parsed_options else ""
    if path:
        # line-buffered: a record is on disk as soon as its request is done, however Locust ends
        _records.append(open(path, "a", buffering=1, encoding="utf-8"))  # noqa: SIM115  # closed at quit


@events.quit.add_listener
def _close_records(**_: Any) -> None:
    for f in _records:
        f.close()


def _ids(path: str, body: Any) -> list[str] | None:
    """The predictions' request ids of a 200 body, or None when the body has none."""
    try:
        ids = [p["request_id"] for p in body["predictions"]] if path == "/batch" else [body["request_id"]]
    except (KeyError, TypeError):
        return None
    return ids if ids and all(isinstance(i, str) and i for i in ids) else None


@events.request.add_listener
def _record(
    name: str, response_time: float, start_time: float, response: Any = None, exception: Any = None, **_: Any
) -> None:
    """One line per request, whatever its outcome: when it was sent (`t`), the endpoint, the status
    (0 when no response came), the time it took, `Retry-After` on a 503, the connection error's
    type (also for a 200 whose body was cut off: its worker died sending it), a 200's request ids."""
    if not _records:
        return
    status = int(getattr(response, "status_code", 0) or 0)
    row: dict[str, Any] = {"t": round(start_time, 4), "ep": name, "status": status, "ms": round(response_time, 2)}
    if status == 0:
        error = getattr(response, "error", None) or exception
        row["error"] = type(error).__name__ if error is not None else "no response"
    elif status == 200 and exception is not None:
        row["error"] = f"{type(exception).__name__} after a 200"
    elif status == 200:
        try:
            row["ids"] = _ids(name, json.loads(response.text))
        except ValueError:  # not JSON: cut off without an error from the client
            row["error"] = "unreadable body after a 200"
    elif status == 503:
        row["retry_after"] = bool(response.headers.get("Retry-After"))
    for f in _records:
        f.write(json.dumps(row) + "\n")


class ChaosUser(FastHttpUser):
    wait_time = between(0.5, 1.5)
    # A request the service holds longer than its own 60 s timeout is an error; connecting
    # should never take long on loopback, even to a stopped server (refused at once).
    network_timeout = 60.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.rng = random.Random()
        self.user_id = f"chaos-{uuid.uuid4().hex[:8]}"

    def _text(self) -> str:
        if self.rng.random() < CHAOS_REPEAT_SHARE:
            return TEXTS[self.rng.randrange(CHAOS_REPEAT_POOL)]
        return f"{self.rng.choice(TEXTS)} ({_salt}-{uuid.uuid4().hex[:12]})"

    def _post(self, path: str, body: dict[str, Any]) -> None:
        # Outcomes are judged from the records (Locust's own failures are ignored): the request
        # event carries the exception of a body cut off after its status, which a caught
        # response marked a success would clear.
        self.client.post(path, json=body, name=path)

    @task(70)
    def predict(self) -> None:
        self._post("/predict", {"text": self._text()})

    @task(20)
    def predict_ab(self) -> None:
        self._post("/predict/ab", {"text": self._text(), "user_id": self.user_id})

    @task(10)
    def batch(self) -> None:
        self._post("/batch", {"texts": [self._text() for _ in range(self.rng.randint(2, 8))]})


# --- the bench -----------------------------------------------------------------------------

_bench_counter = itertools.count()
_bench_salt = random.Random().randrange(1 << 30)


class PredictUser(FastHttpUser):
    wait_time = constant(0)
    texts: list[str] = []

    def on_start(self) -> None:
        if not PredictUser.texts:  # the bench's own texts, read once by the first user
            PredictUser.texts = load_texts(Path(os.environ.get("BENCH_TEXTS", CORPUS)), 300)
        self.unique = os.environ.get("BENCH_MODE", "unique") == "unique"

    @task
    def predict(self) -> None:
        n = next(_bench_counter)
        if self.unique:
            text = f"{self.texts[n % len(self.texts)]} [{_bench_salt}-{n}]"
        else:
            text = self.texts[n % min(20, len(self.texts))]
        with self.client.post("/predict", json={"text": text}, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"status {r.status_code}")
            elif r.json().get("label") not in ("positive", "negative"):
                r.failure("no label in response")
