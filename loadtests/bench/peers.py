"""The servers `make bench` measures, and what users would run instead of this service, to
measure it against side by side: a lean batching server of the same ONNX int8 model (LitServe,
`serve_litserve`) and the naive server that runs one PyTorch fp32 forward per request (Starlette,
`naive_app`). Each peer serves `POST /predict {"text"}` and answers with the label, score and
probabilities, and nothing else: no cache, no limits, no analytics.

    python -m loadtests.bench.peers litserve --model sentiment-minilm-int8:latest --port 8001
    python -m loadtests.bench.peers naive --model sentiment-minilm:latest --port 8002

`Server` is one server under test (the service or a peer), `start_peer` starts a peer, and
`focus` lets only the one being measured run. `profile_service` samples the service with py-spy
during one more case and splits its CPU into the model (tokenizer and forward pass) and buckets
of everything else (`cpu_split`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtests.harness import cpu_seconds, pss_mb
from tests.support.serving import ROOT, Served, free_port, stop_group


@dataclass
class Server:
    """A server under test: its root process (its children are its workers) and URL."""

    name: str
    url: str
    proc: subprocess.Popen[bytes] | None = None
    served: Served | None = None
    results: list[dict] = field(default_factory=list)

    @property
    def pid(self) -> int:
        if self.served is not None:
            assert self.served.proc is not None
            return self.served.proc.pid
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def pss_mb(self) -> float:
        return pss_mb(self.pid)

    def pause(self, paused: bool) -> None:
        """SIGSTOP or SIGCONT the server's whole process group (its own session)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def stop(self) -> None:
        self.pause(False)
        if self.served is not None:
            self.served.stop()
        elif self.proc is not None:
            stop_group(self.proc, timeout=30)


def start_peer(name: str, model: str, workdir: Path) -> Server:
    """The peer `name` (litserve or naive) on a free port, ready: its first answer came back."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "loadtests.bench.peers", name, "--model", model, "--port", str(port)]
    with (workdir / f"{name}.log").open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(name, f"http://127.0.0.1:{port}", proc=proc)

    def ready(r: httpx.Response) -> bool:
        return r.status_code == 200 and "label" in r.json()

    deadline = time.monotonic() + 240
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: see {workdir / (name + '.log')}")
        try:
            if ready(httpx.post(f"{server.url}/predict", json={"text": "warm up"}, timeout=30)):
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{name} not ready in 240 s: see {workdir / (name + '.log')}")
        time.sleep(0.5)


# Every server under test. Only the one being measured runs: the others are stopped with SIGSTOP,
# because an idle server is not always idle (LitServe's workers poll their queues: 0.39 cores
# while it served nothing, measured here), and that CPU would be charged to the others.
SERVERS: list[Server] = []


def focus(server: Server) -> None:
    for other in SERVERS:
        if other is not server:
            other.pause(True)
    server.pause(False)
    time.sleep(0.5)


def raw_throughput(tag: str, texts: list[str], seconds: float, threads: int, batch: int = 32) -> dict[str, float]:
    """The raw model: texts per second of batch forward passes in a loop, no HTTP, no queue."""
    from models import runtime

    predictor = runtime.load(tag, threads)
    predictor.predict(texts[:batch])
    done, times, i = 0, [], 0
    cpu0, started = time.process_time(), time.perf_counter()
    while time.perf_counter() - started < seconds:
        chunk = [f"{texts[(i * batch + j) % len(texts)]} [{i}-{j}]" for j in range(batch)]
        t = time.perf_counter()
        predictor.predict(chunk)
        times.append(time.perf_counter() - t)
        done += batch
        i += 1
    elapsed = time.perf_counter() - started
    return {
        "texts_per_s": round(done / elapsed, 1),
        "batch_ms_median": round(statistics.median(times) * 1000, 2),
        "cpu_ms_per_text": round((time.process_time() - cpu0) * 1000 / done, 3),
    }


# --- py-spy: where the service's CPU goes ---------------------------------------------------

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


# --- the peers --------------------------------------------------------------------------------


def _lit_api() -> type:
    """LitServe's API class for the lean peer. LitServe starts its workers with spawn, which
    pickles the API by reference, so the class must be this module's attribute; it is built on
    first use (module __getattr__ below) so that litserve, the bench extra, is imported only by
    the bench."""
    import litserve as ls

    class SentimentAPI(ls.LitAPI):  # type: ignore[misc]
        def __init__(self, tag: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.tag = tag

        def setup(self, device: str) -> None:
            from models import runtime

            self.model = runtime.load(self.tag, threads=1)

        # No annotation on `request`: LitServe builds its route from it, and a postponed annotation
        # (a string) makes it a query parameter.
        def decode_request(self, request):  # type: ignore[no-untyped-def]
            return str(request["text"])

        def predict(self, texts: list[str]) -> list[Any]:
            return self.model.predict(texts)

        def encode_response(self, output: Any) -> dict[str, Any]:
            return {"label": output.label, "score": output.score, "probabilities": output.probabilities}

    SentimentAPI.__qualname__ = "SentimentAPI"
    globals()["SentimentAPI"] = SentimentAPI
    return SentimentAPI


def __getattr__(name: str) -> Any:
    if name == "SentimentAPI":
        return _lit_api()
    raise AttributeError(name)


def serve_litserve(model: str, port: int, workers: int = 2, max_batch: int = 32, wait_ms: float = 5.0) -> None:
    """The lean batching peer: LitServe around the store's ONNX int8 model, batches of up to 32
    texts with a 5 ms wait, 2 inference workers of 1 ONNX Runtime thread each (the service's own
    layout on 2 cores)."""
    import litserve as ls

    api = _lit_api()(model, max_batch_size=max_batch, batch_timeout=wait_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=workers, timeout=60)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")


def naive_app() -> Any:
    """The naive peer: one PyTorch fp32 forward per request, no batching, no cache; transformers'
    tokenizer and model straight from the store's fp32 folder (PEER_MODEL), 1 torch thread."""
    import bentoml
    import torch
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from transformers import AutoTokenizer

    from models.classifier import load_classifier
    from models.runtime import read_info

    torch.set_num_threads(1)
    folder = bentoml.models.get(os.environ["PEER_MODEL"]).path
    info = read_info(Path(folder))
    max_length, temperature = int(info["max_length"]), float(info.get("temperature", 1.0))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_classifier(Path(folder)).eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]

    def forward(text: str) -> dict:
        with torch.inference_mode():
            enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            probs = (model(**enc).logits / temperature).softmax(-1)[0].tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return {"label": labels[best], "score": probs[best], "probabilities": dict(zip(labels, probs, strict=True))}

    async def predict(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse(await run_in_threadpool(forward, body["text"]))

    return Starlette(routes=[Route("/predict", predict, methods=["POST"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer", choices=["litserve", "naive"])
    parser.add_argument("--model", default=None, help="default: the int8 model for litserve, fp32 for naive")
    parser.add_argument("--port", type=int, default=None, help="default 8001 (litserve), 8002 (naive)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=32, help="litserve")
    parser.add_argument("--wait-ms", type=float, default=5.0, help="litserve")
    args = parser.parse_args()
    if args.peer == "litserve":
        model, port = args.model or "sentiment-minilm-int8:latest", args.port or 8001
        serve_litserve(model, port, args.workers, args.max_batch, args.wait_ms)
        return
    import uvicorn

    os.environ["PEER_MODEL"] = args.model or "sentiment-minilm:latest"
    uvicorn.run(
        "loadtests.bench.peers:naive_app",
        factory=True,
        host="127.0.0.1",
        port=args.port or 8002,
        workers=args.workers,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
