"""What a call on the event loop's thread costs when another thread of the worker is busy in
Python: `python -m loadtests.gil_handover` (docs/performance.md, "The GIL on the request path").

A call that releases the GIL (os.urandom, os.write) gets it back only when the other thread
drops it, after its switch interval (sys.getswitchinterval(), 5 ms by default). Each call is
timed alone and then beside a thread running pure Python, as the analytics writer or the
inference thread between forward calls does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable

from service.request_ids import random_uuid
from storage.analytics.spill import _write


def timings(call: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1e6)
    return sorted(out)


def summary(us: list[float]) -> str:
    n = len(us)
    return f"p50 {us[n // 2]:9.1f}  mean {statistics.mean(us):9.1f}  p99 {us[int(n * 0.99)]:9.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args(argv)
    row = b'{"request_id":"3f1c2a9e-8b7d-4c6e-9a5f-1b2c3d4e5f60","label":"positive"}'.ljust(299) + b"\n"
    with tempfile.TemporaryDirectory() as tmp:
        fd = os.open(os.path.join(tmp, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        calls: dict[str, Callable[[], object]] = {
            "uuid.uuid4() (os.urandom)": uuid.uuid4,
            "random_uuid() (4 KiB draws)": random_uuid,
            "os.write, 300 bytes": lambda: os.write(fd, row),
            "spill._write, 300 bytes": lambda: _write(fd, row),
        }
        stop = threading.Event()

        def busy() -> None:
            x = 0
            while not stop.is_set():
                for i in range(1000):
                    x += i

        print(f"microseconds per call, {args.calls} calls; switch interval {sys.getswitchinterval() * 1000:.0f} ms")
        alone = {name: timings(call, args.calls) for name, call in calls.items()}
        thread = threading.Thread(target=busy, daemon=True)
        thread.start()
        try:
            beside = {name: timings(call, args.calls) for name, call in calls.items()}
        finally:
            stop.set()
            thread.join()
            os.close(fd)
    for name in calls:
        print(f"{name:30s} alone:  {summary(alone[name])}")
        print(f"{'':30s} beside: {summary(beside[name])}")


if __name__ == "__main__":
    main()
