"""What every suite shares: the texts, the one /metrics reader, the one percentile, the one Locust
launcher, the process groups' CPU and memory, the model store, and teardown.

Servers are the harness's (tests/support); `stopped` stops the ones a run started, however it ends.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.support.serving import ROOT

# --- texts -------------------------------------------------------------------------------

# The held-out validation reviews: the load tests' texts.
CORPUS = "var/data/corpus/validation.jsonl"
# Reviews from a source never used in training: the benchmarks' texts.
OUT_OF_SOURCE = "var/data/corpus/out_of_source.jsonl"
# Without the corpus (no `make model` yet).
FALLBACK = (
    "The food was cold and the waiter ignored us all evening.",
    "A warm, funny and beautifully acted film with a great ending.",
    "Delivery took three weeks and the box arrived crushed.",
    "Exactly what I needed, works perfectly and the battery lasts for days.",
    "I want my money back; the screen cracked on the second day.",
    "Friendly staff, clean rooms, and a view worth every penny.",
    "The plot drags, the jokes fall flat, and it is far too long.",
    "Solid build quality; I would buy it again without a second thought.",
)


def load_texts(path: Path, max_chars: int, fallback: Sequence[str] = FALLBACK) -> list[str]:
    """Each text of the JSON-lines file cut to `max_chars`, or `fallback` without the file."""
    if path.exists():
        with path.open(encoding="utf-8") as f:
            texts = [json.loads(line)["text"][:max_chars] for line in f if line.strip()]
        if texts:
            return texts
    return list(fallback)


def log(msg: str) -> None:
    print(msg, flush=True)


# --- figures -----------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest rank, as every report of the suites computes it; None without values."""
    s = sorted(values)
    if not s:
        return None
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Every sample of a /metrics text, keyed by (name, sorted labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    return sum(
        v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    )


def read_metrics(url: str, timeout: float = 10) -> str:
    """The service's /metrics page; an error (httpx.HTTPError) for anything but a 200."""
    return httpx.get(f"{url}/metrics", timeout=timeout).raise_for_status().text


def metric_totals(
    url: str, names: Iterable[str], timeout: float = 10, labels: dict[str, str] | None = None
) -> dict[str, float]:
    """Sums of the named series (all labels, or those with `labels`) on the service's /metrics."""
    samples = parse_metrics(read_metrics(url, timeout))
    return {name: metric_sum(samples, name, **(labels or {})) for name in names}


# --- Locust --------------------------------------------------------------------------------

# Every suite's traffic: the plan's users, the chaos run's and the bench's, a class each.
LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")


def start_locust(
    user: str, url: str, options: Sequence[str], log_to: Path | None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Locust on loadtests/locustfile.py with only the `user` class, `options` on its command line,
    its output to `log_to` (dropped when None)."""
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", url, *options, user]
    out = log_to.open("wb") if log_to is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log_to is not None:
            out.close()  # type: ignore[union-attr]


def stop_locust(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM, which ends a headless Locust cleanly (its users finish their requests), then a kill."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- processes -------------------------------------------------------------------------------


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its living descendants; none when it has ended."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


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


def pss_mb(pid: int) -> float:
    """The proportional memory (shared pages counted once) of a process and its descendants, MB."""
    total = 0
    for p in process_tree(pid):
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            continue
    return round(total / 2**20, 1)


def busy_seconds() -> float:
    """CPU seconds all the machine's cores have spent busy since boot (/proc/stat)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - t.iowait


class MachineLoad:
    """How busy all the machine's cores were between start() and stop(), from /proc/stat."""

    def start(self) -> MachineLoad:
        self.t0 = psutil.cpu_times()
        return self

    def stop(self) -> float:
        t1 = psutil.cpu_times()
        idle = (t1.idle + t1.iowait) - (self.t0.idle + self.t0.iowait)
        total = sum(t1) - sum(self.t0)
        return round(1 - idle / total, 3) if total else 0.0


@dataclass
class ResourceSampler:
    """CPU (cores in use) and memory (PSS, so shared pages count once) of process groups,
    each given by its root pid, sampled every `interval` seconds in a thread."""

    roots: dict[str, int]
    interval: float = 1.0
    extras: dict[str, Callable[[], float | None]] = field(default_factory=dict)  # more columns, e.g. Redis memory
    rows: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._last: dict[int, float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, previous: float) -> float:
        now = time.monotonic()
        row: dict = {"t": time.time()}
        for name, root in self.roots.items():
            cpu = mem = 0.0
            for proc in process_tree(root):
                try:
                    times = proc.cpu_times()
                    total = times.user + times.system
                    if proc.pid in self._last and now > previous:
                        cpu += (total - self._last[proc.pid]) / (now - previous)
                    self._last[proc.pid] = total
                    mem += proc.memory_full_info().pss
                except psutil.Error:
                    continue
            row[f"{name}_cores"] = round(cpu, 3)
            row[f"{name}_mb"] = round(mem / 2**20, 1)
        for name, read in self.extras.items():
            try:
                row[name] = read()
            except Exception:
                row[name] = None
        self.rows.append(row)
        return now

    def _run(self) -> None:
        previous = self._sample(time.monotonic())
        while not self._stop.wait(self.interval):
            previous = self._sample(previous)

    def start(self) -> ResourceSampler:
        self._thread.start()
        return self

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.rows


# --- servers -------------------------------------------------------------------------------

MODEL, REFERENCE = "sentiment-minilm-int8:latest", "sentiment-minilm:latest"
QUICK_HOME = ROOT / "var" / "bentoml-quick"


def model_store() -> tuple[str, Path]:
    """The profile and BentoML home to use: the store's full models, or the quick ones (built
    into var/bentoml-quick when missing, about a minute)."""
    home = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")
    if all((home / "models" / tag.split(":")[0] / "latest").exists() for tag in (MODEL, REFERENCE)):
        return "full", home
    if not all((QUICK_HOME / "models" / tag.split(":")[0] / "latest").exists() for tag in (MODEL, REFERENCE)):
        log(f"no full models in {home}: building the quick ones into {QUICK_HOME} ...")
        env = {**os.environ, "BENTOML_HOME": str(QUICK_HOME)}
        subprocess.run([sys.executable, "-m", "models.build", "--profile", "quick"], cwd=ROOT, env=env, check=True)
    return "quick", QUICK_HOME


class Stoppable(Protocol):
    def stop(self) -> None: ...


@contextmanager
def stopped() -> Iterator[list[Any]]:
    """A list for the servers a run starts, each appended before its start (as the harness's
    serve_on_backends does), so a failed start is stopped too; on leaving, however, every one is
    stopped, the last started first, and a stop that fails is logged while the rest go on."""
    started: list[Stoppable] = []
    try:
        yield started
    finally:
        for server in reversed(started):
            try:
                server.stop()
            except Exception as exc:  # keep tearing down the rest
                log(f"stopping {type(server).__name__}: {exc}")
