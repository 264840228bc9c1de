"""Loaded by a served instance of the tests (on its PYTHONPATH): its models raise on any forward
call with a text holding FAILING_MARKER, so a job's chunk that holds one fails every attempt.
A test model that raises, for tests/integration/test_abuse.py; never on a real deployment's path."""

from __future__ import annotations

import os

MARKER = os.environ.get("FAILING_MARKER", "")

if MARKER:
    from models import runtime

    _load_dir = runtime.load_dir

    def _failing_load_dir(*args, **kwargs):  # type: ignore[no-untyped-def]
        predictor = _load_dir(*args, **kwargs)
        predict = predictor.predict

        def failing(texts):  # type: ignore[no-untyped-def]
            if any(MARKER in text for text in texts):
                raise RuntimeError("the test model raises on this text")
            return predict(texts)

        predictor.predict = failing
        return predictor

    runtime.load_dir = _failing_load_dir
