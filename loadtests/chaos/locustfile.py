"""The chaos run's traffic for Locust: 70% /predict, 20% /predict/ab, 10% /batch (2 to 8 texts).

Every request, whatever its outcome, is one JSON line in the file --records names (one file per
Locust process): when it was sent (`t`, epoch seconds), the endpoint, the status (0 when no
response came), the time it took, `Retry-After` on a 503, the connection error's type (also for
a 200 whose body was cut off: its worker died while sending it), and for a 200 the request id of
every prediction in the body. loadtests/chaos/tally.py reads them.

Texts: reviews of the held-out validation corpus (or the built-in list), each with a marker the
cache has never seen, except a quarter of them, drawn from a pool of 100 that repeats, so Redis
answers hits while it is up.
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path
from typing import IO, Any

from locust import FastHttpUser, between, events, task

from loadtests.texts import CORPUS, load_texts

TEXTS = load_texts(Path(CORPUS), 500)
REPEAT_SHARE = 0.25
REPEAT_POOL = min(100, len(TEXTS))
_salt = uuid.uuid4().hex[:8]
_out: list[IO[str]] = []


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--records", default="", env_var="CHAOS_RECORDS", help="write one JSON line per request here")


@events.init.add_listener
def _open(environment: Any, **_: Any) -> None:
    path = environment.parsed_options.records if environment.parsed_options else ""
    if path:
        # line-buffered: a record is on disk as soon as its request is done, however Locust ends
        _out.append(open(path, "a", buffering=1, encoding="utf-8"))  # noqa: SIM115  # closed at quit


@events.quit.add_listener
def _close(**_: Any) -> None:
    for f in _out:
        f.close()


def _ids(path: str, body: Any) -> list[str] | None:
    """The predictions' request ids of a 200 body, or None when the body has none."""
    try:
        if path == "/batch":
            ids = [p["request_id"] for p in body["predictions"]]
        else:
            ids = [body["request_id"]]
    except (KeyError, TypeError):
        return None
    return ids if ids and all(isinstance(i, str) and i for i in ids) else None


@events.request.add_listener
def _record(
    name: str,
    response_time: float,
    start_time: float,
    response: Any = None,
    exception: Any = None,
    **_: Any,
) -> None:
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
    for f in _out:
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
        if self.rng.random() < REPEAT_SHARE:
            return TEXTS[self.rng.randrange(REPEAT_POOL)]
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
