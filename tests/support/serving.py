"""A real `bentoml serve` of the service in a subprocess, for the benchmarks and the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]


def stop_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM to the process group of `proc` (started in a session of its own, so the signal
    reaches its workers too), SIGKILL if it has not ended within `timeout` seconds. Descendants
    that outlive it (a BentoML worker whose parent was killed keeps running, serving nothing
    but taking CPU from whatever runs next) are killed too."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _, alive = psutil.wait_procs(family, timeout=5)
    for orphan in alive:
        with contextlib.suppress(psutil.Error):
            orphan.kill()


def post_retrying_sheds(url: str, body: dict, headers: dict[str, str], tries: int = 10) -> httpx.Response:
    """POST `body` to `url`, retrying a shed as clients do: a 503, which must carry Retry-After,
    is sent again after 0.2 s, up to `tries` times. Busy test machines do shed now and then."""
    for _ in range(tries):
        r = httpx.post(url, json=body, headers=headers, timeout=60)
        if r.status_code != 503:
            return r
        assert r.headers.get("Retry-After"), r.text
        time.sleep(0.2)
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(
    url: str,
    what: str,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    detail=lambda: "",
    ok=lambda r: r.status_code == 200,
    interval: float = 0.3,
) -> None:
    """Poll `url` until `ok(response)`; RuntimeError if `proc` exits first or `timeout` passes,
    with `detail()` (a log's tail, say) in the message."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{detail()}")
        try:
            if ok(httpx.get(url, timeout=3)):
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready in {timeout:.0f} s:\n{detail()}")
        time.sleep(interval)


class Managed:
    """A process started on entering a `with` block and stopped on leaving it, however it is
    left; a start that fails stops what it had begun. Fixtures use it so that no server a test
    started outlives pytest."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def embedded_env(bentoml_home: Path, models: dict[str, str], workdir: Path, **extra: str) -> dict[str, str]:
    """A served instance's environment on the embedded backends: the tests' model store and
    models, SQLite analytics and a SPILL_DIR of its own in `workdir`, plus `extra` settings."""
    return {
        "BENTOML_HOME": str(bentoml_home),
        **models,
        "DATABASE_URL": f"sqlite:///{workdir / 'analytics.db'}",
        "SPILL_DIR": str(workdir / "spill"),
        **extra,
    }


# Settings this pytest process put in its own environment for the in-process service
# (tests/service/conftest.py); an instance started with Served does not inherit them.
IN_PROCESS_ONLY: set[str] = set()


class Served(Managed):
    """`bentoml serve service.service:Sentiment` on a free port with the given environment."""

    def __init__(self, env: dict[str, str], log: Path, workers: int | None = 2, source: Path = ROOT) -> None:
        """`workers` None leaves SERVICE_WORKERS to `env` or the service's default; `source` is
        the checkout whose service runs (another one: an earlier version, for the benchmark)."""
        self.source = source
        inherited = {k: v for k, v in os.environ.items() if k not in IN_PROCESS_ONLY}
        self.env = {**inherited, **({"SERVICE_WORKERS": str(workers)} if workers else {}), **env}
        # A BentoML home of its own, sharing the model store: `bentoml serve` wipes and reuses
        # $BENTOML_HOME/prometheus_multiproc_dir, so two instances on one home mix (and erase)
        # each other's metrics.
        store = Path(self.env.get("BENTOML_HOME") or Path.home() / "bentoml") / "models"
        home = Path(tempfile.mkdtemp(prefix="sentiment-served-home-"))
        (home / "models").symlink_to(store.resolve())
        self.env["BENTOML_HOME"] = str(home)
        self.log = log
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> Served:
        cmd = [sys.executable, "-m", "bentoml", "serve", "service.service:Sentiment", "--port", str(self.port)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=self.source, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_ready(f"{self.url}/readyz", "bentoml serve", timeout, self.proc, self.tail)
        return self

    def stop(self) -> None:
        """SIGTERM, as an orchestrator would: shutdown hooks run (analytics flushed or spilled)."""
        if self.proc is None:
            return
        stop_group(self.proc, timeout=60)
        self.proc = None

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def inferred_texts(self) -> float:
        """Texts run through a model so far, over all workers and models."""
        total = 0.0
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith("sentiment_inferred_texts_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return total
