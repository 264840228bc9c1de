"""The servers `make bench` measures (loadtests/bench.py), and what users would run instead of
this service, to measure it against side by side: a lean batching server of the same ONNX int8
model (LitServe, litserve_server.py) and the naive server that runs one PyTorch fp32 forward per
request (Starlette, naive_server.py). Each peer serves `POST /predict {"text"}` and answers with
the label, score and probabilities, and nothing else: no cache, no limits, no analytics.

`Server` is one server under test (the service or a peer), `start_peer` starts a peer, and
`focus` lets only the one being measured run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from tests.support.serving import ROOT, Served, free_port, stop_group


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its living descendants."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(*pids: int) -> float:
    """CPU seconds (user and system) of the processes and all their living descendants."""
    total = 0.0
    for pid in pids:
        for p in process_tree(pid):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                continue
    return total


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

    def processes(self) -> list[psutil.Process]:
        return process_tree(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def pss_mb(self) -> float:
        total = 0
        for p in self.processes():
            try:
                total += p.memory_full_info().pss
            except psutil.Error:
                continue
        return round(total / 2**20, 1)

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


def start_peer(name: str, module: str, model: str, workdir: Path) -> Server:
    port = free_port()
    log = (workdir / f"{name}.log").open("wb")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", module, "--model", model, "--port", str(port)]
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
