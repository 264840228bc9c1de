"""Where the service's CPU goes, from py-spy: `make bench` samples the service's processes during
one more case (`profile_service`) and splits the samples into the model (tokenizer and forward
pass) and buckets of everything else (`cpu_split`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# A sampled stack is the model's when it runs inside the predictor (models/runtime.py): the
# tokenizer and the forward pass. Everything else (HTTP, framework, cache, limiter, analytics,
# metrics, batching) is overhead. Buckets for the overhead, by the first matching frame file.
OVERHEAD_BUCKETS = [
    ("HTTP server (uvicorn, httptools, h11)", ("uvicorn/", "httptools", "h11/")),
    (
        "BentoML (its middlewares, access log, tracing)",
        ("bentoml/", "_bentoml_impl/", "_bentoml_sdk/", "opentelemetry/"),
    ),
    ("FastAPI, Starlette, pydantic", ("fastapi/", "starlette/", "pydantic/", "pydantic_core")),
    (
        "prediction cache and rate limiter",
        ("redis/", "limits/", "cachetools/", "storage/cache.py", "storage/ratelimit.py"),
    ),
    ("analytics writer", ("storage/analytics/", "sqlalchemy/", "psycopg", "sqlite3")),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("this service's own code", ("service/",)),
    ("asyncio event loop", ("asyncio/", "uvloop")),
]


def classify(stack: str) -> str:
    if "models/runtime.py" in stack:
        return "model"
    frames = stack.split(";")
    for frame in reversed(frames):  # the innermost frame that names a known library
        for bucket, needles in OVERHEAD_BUCKETS:
            if any(n in frame for n in needles):
                return bucket
    return "other (threads, GC, interpreter)"


def cpu_split(raw: Path) -> dict[str, float]:
    """Share of active samples per bucket, from py-spy's raw (collapsed) output."""
    counts: dict[str, int] = {}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        bucket = classify(stack)
        counts[bucket] = counts.get(bucket, 0) + int(n)
    total = sum(counts.values()) or 1
    return {k: round(v / total, 4) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def profile_service(pid: int, seconds: int, workdir: Path, run_case: Callable[[int], dict]) -> dict | None:
    """One more case of the service, `run_case(seconds)`, with py-spy sampling all the processes
    under `pid` for `seconds` (the case runs 2 s less, inside the sampling)."""
    raw = workdir / "service-profile.txt"
    cmd = [
        str(Path(sys.executable).parent / "py-spy"),
        "record",
        "--nonblocking",
        "--subprocesses",
        "-r",
        "100",
        "-d",
        str(seconds),
        "-f",
        "raw",
        "-o",
        str(raw),
        "-p",
        str(pid),
    ]
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1)
    case = run_case(seconds - 2)
    _, err = spy.communicate(timeout=seconds + 60)
    if spy.returncode != 0 or not raw.exists():
        print(f"py-spy failed: {err.decode(errors='replace')[-500:]}", file=sys.stderr)
        return None
    split = cpu_split(raw)
    model = split.get("model", 0.0)
    return {"case": case, "split": split, "model_share": model, "raw": str(raw)}
