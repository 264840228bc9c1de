"""Closed-loop /predict load for `make bench`: each user sends its next request on reply.

BENCH_MODE=unique gives every request a text never sent before (no cache hits);
BENCH_MODE=repeated cycles through a few texts (all cache hits after the first round).
"""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

from locust import FastHttpUser, constant, task

from loadtests.texts import CORPUS, load_texts

MODE = os.environ.get("BENCH_MODE", "unique")
POOL_FILE = Path(os.environ.get("BENCH_TEXTS", CORPUS))


TEXTS = load_texts(POOL_FILE, 300)
REPEATED = TEXTS[:20]
_counter = itertools.count()
_salt = random.Random().randrange(1 << 30)


class PredictUser(FastHttpUser):
    wait_time = constant(0)

    @task
    def predict(self) -> None:
        n = next(_counter)
        if MODE == "unique":
            text = f"{TEXTS[n % len(TEXTS)]} [{_salt}-{n}]"
        else:
            text = REPEATED[n % len(REPEATED)]
        with self.client.post("/predict", json={"text": text}, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"status {r.status_code}")
            elif r.json().get("label") not in ("positive", "negative"):
                r.failure("no label in response")
