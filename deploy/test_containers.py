"""`make test-containers`: the image and the air-gapped stack, built and checked for real.

    python deploy/test_containers.py [--skip-build] [--keep]

1. A Docker engine of its own (`dockerd --bridge=none --iptables=false`: no bridge, no
   firewall rules; every container on the host network, traffic on loopback), unless one
   already answers; it is stopped at the end only if this script started it.
2. The local base image from Debian packages (deploy/base-image.sh) and the service image
   (deploy/image.py, the full models inside).
3. The image alone (`docker run --network host`, embedded cache and SQLite): every contract
   check of loadtests/contract.py.
4. The stack: compose.yaml with compose.airgap.yaml (two replicas behind nginx, Redis,
   PostgreSQL, the migration, Prometheus): one rate limit and one cache shared by both
   replicas through the balancer, rows in the stack's PostgreSQL, both targets up in
   Prometheus; then the quick load-test profile through nginx.
5. Everything torn down (volumes included).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests import contract  # noqa: E402
from loadtests.serving import wait_ready  # noqa: E402

BASE_IMAGE = os.environ.get("BASE_IMAGE", "sentiment-base:bookworm")
PROJECT = "sentiment-airgap-test"
COMPOSE = ["docker-compose", "-p", PROJECT, "-f", "compose.yaml", "-f", "compose.airgap.yaml"]
STACK_ENV = {
    "REDIS_PASSWORD": f"r-{uuid.uuid4().hex[:12]}",
    "POSTGRES_PASSWORD": f"p-{uuid.uuid4().hex[:12]}",
    "ADMIN_API_KEY": f"a-{uuid.uuid4().hex[:12]}",
    "GRAFANA_ADMIN_PASSWORD": "unused-here",
    "RATE_LIMIT_PREDICT": "100/minute",
}
RESULTS: list[tuple[str, str]] = []


def step(name: str) -> None:
    print(f"\n== {name}", flush=True)


def record(name: str, outcome: str) -> None:
    RESULTS.append((name, outcome))
    print(f"   {name}: {outcome}", flush=True)


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, cwd=ROOT, **kw)


class Docker:
    """The Docker engine: the one that answers, or one started here (and stopped here)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def answers() -> bool:
        return subprocess.run(["docker", "info"], capture_output=True).returncode == 0

    def start(self) -> None:
        if self.answers():
            print("using the Docker engine that is running", flush=True)
            return
        if not shutil.which("dockerd"):
            raise SystemExit("dockerd not found: install docker.io (.ci/run does)")
        log = (ROOT / "var" / "dockerd.log").open("ab")
        self.proc = subprocess.Popen(
            ["dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false"], stdout=log, stderr=log
        )
        deadline = time.monotonic() + 60
        while not self.answers():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("dockerd did not start: see var/dockerd.log")
            time.sleep(1)
        print(f"started dockerd (pid {self.proc.pid})", flush=True)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            print("stopped dockerd", flush=True)


def models_env() -> dict[str, str]:
    """The models to put in the image: the full ones in the BentoML store (make model), or,
    where the store has none (a fresh CI machine), the quick profile built into a store of its
    own under var/, so the user's store is never filled with quick models."""
    bentoml = str(Path(sys.executable).parent / "bentoml")
    have = [
        subprocess.run([bentoml, "models", "get", f"{name}:latest"], capture_output=True).returncode == 0
        for name in ("sentiment-minilm", "sentiment-minilm-int8")
    ]
    if all(have):
        record("models", "the full models of the BentoML store")
        return {}
    env = {"BENTOML_HOME": str(ROOT / "var" / "bentoml-quick")}
    step("no full models in the store: the quick profile, into var/bentoml-quick")
    sh([sys.executable, "-m", "models.build", "--profile", "quick"], env={**os.environ, **env})
    record("models", "quick profile (var/bentoml-quick): the store had no full models")
    return env


def build(skip: bool) -> str:
    image_file = ROOT / "var" / "image"
    if skip and image_file.exists():
        return image_file.read_text().strip()
    models = models_env()
    step("base image from Debian packages")
    started = time.monotonic()
    sh(["bash", "deploy/base-image.sh", BASE_IMAGE])
    record("base image", f"{BASE_IMAGE} in {time.monotonic() - started:.0f} s")
    step("service image")
    started = time.monotonic()
    sh([sys.executable, "deploy/image.py", "--base-image", BASE_IMAGE], env={**os.environ, **models})
    image = image_file.read_text().strip()
    size = sh(["docker", "image", "inspect", "-f", "{{.Size}}", image], capture_output=True).stdout.strip()
    record("service image", f"{image}, {int(size) / 1e9:.2f} GB, built in {time.monotonic() - started:.0f} s")
    return image


def check_image(image: str) -> None:
    step("the image alone: contract checks")
    name = f"sentiment-contract-{uuid.uuid4().hex[:6]}"
    port = 3055
    sh(["docker", "run", "-d", "--rm", "--network", "host", "--name", name, image, "serve", "--port", str(port)])
    try:
        user = sh(["docker", "exec", name, "id", "-u"], capture_output=True).stdout.strip()
        assert user != "0", "the server runs as root"
        record("non-root user", f"uid {user}")
        torch = sh(
            ["docker", "exec", name, "python", "-c", "import torch; print(torch.__version__)"], capture_output=True
        ).stdout.strip()
        assert torch.endswith("+cpu"), torch
        record("torch in the image", torch)
        wait_ready(f"http://127.0.0.1:{port}/readyz", "the image", 300, interval=1)
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        results = contract.run(f"http://127.0.0.1:{port}")
        failed = [(n, p) for n, p in results if p]
        for n, p in failed:
            print(f"   FAIL {n}: {p}")
        assert not failed, f"{len(failed)} contract checks failed"
        record("contract checks on the image", f"{len(results)} of {len(results)} passed; models {health['model']}")
    finally:
        subprocess.run(["docker", "logs", "--tail", "30", name], cwd=ROOT)
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def check_stack(image: str, env: dict[str, str]) -> None:
    step("air-gapped stack: compose.yaml + compose.airgap.yaml")
    started = time.monotonic()
    sh([*COMPOSE, "build"], env=env)
    sh([*COMPOSE, "up", "-d"], env=env)
    wait_ready("http://127.0.0.1:8080/readyz", "the stack", 400, interval=1)
    record("stack up", f"in {time.monotonic() - started:.0f} s")
    admin = {"Authorization": f"Bearer {env['ADMIN_API_KEY']}"}

    # one rate limit through the balancer: 200 requests at 100 per minute from one client
    client = f"198.18.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"
    text = f"Shared limits across replicas {uuid.uuid4().hex[:6]}"

    def one(_: int) -> int:
        r = httpx.post(
            "http://127.0.0.1:8080/predict", json={"text": text}, headers={"X-Forwarded-For": client}, timeout=60
        )
        return r.status_code

    with cf.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(200)))
    assert codes.count(200) == 100 and codes.count(429) == 100, {c: codes.count(c) for c in set(codes)}
    record("one rate limit through nginx", "exactly 100 x 200 and 100 x 429 of 200 at 100/minute")

    # one cache: first predicted by replica 1, a hit on replica 2
    text = f"A cache shared by every replica {uuid.uuid4().hex[:6]}"
    first = httpx.post("http://127.0.0.1:3101/predict", json={"text": text}, timeout=60).json()
    second = httpx.post("http://127.0.0.1:3102/predict", json={"text": text}, timeout=60).json()
    assert first["cached"] is False and second["cached"] is True, (first, second)
    record("one cache", "predicted on replica 1, a cache hit on replica 2")

    # rows in the stack's PostgreSQL
    time.sleep(2)
    import sqlalchemy as sa

    engine = sa.create_engine(f"postgresql+psycopg://sentiment:{env['POSTGRES_PASSWORD']}@127.0.0.1:5440/sentiment")
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT count(*) FROM predictions").scalar_one()
        ids = conn.exec_driver_sql(
            "SELECT count(*) FROM predictions WHERE request_id = ANY(%s)",
            ([first["request_id"], second["request_id"]],),
        ).scalar_one()
    engine.dispose()
    assert rows >= 102 and ids == 2, (rows, ids)
    record("rows in the stack's PostgreSQL", f"{rows} predictions, both replicas' rows present")

    # Prometheus: both replicas scraped
    def both_up(r: httpx.Response) -> bool:
        targets = r.json()["data"]["activeTargets"]
        return len(targets) == 2 and all(t["health"] == "up" for t in targets)

    wait_ready("http://127.0.0.1:9091/api/v1/targets", "both Prometheus targets", 60, ok=both_up, interval=1)
    record("Prometheus", "both replicas' targets up")
    summary = httpx.get("http://127.0.0.1:8080/analytics/summary", headers=admin, timeout=10).json()
    record("analytics through nginx", f"{summary['total']} predictions in the last hour")

    step("quick load-test profile through nginx")
    out = ROOT / "var" / "loadtest" / "stack"
    shutil.rmtree(out, ignore_errors=True)
    sh(
        [sys.executable, "-m", "loadtests.run", "all", "--profile", "quick", "--url", "http://127.0.0.1:8080"]
        + ["--out", str(out), "--no-thresholds"],
        env={**os.environ, "ADMIN_API_KEY": env["ADMIN_API_KEY"]},
    )
    record("quick load test through nginx", f"reports in {out.relative_to(ROOT)}/<scenario>/report.md")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-build", action="store_true", help="reuse the image named in var/image")
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    args = parser.parse_args()
    (ROOT / "var").mkdir(exist_ok=True)
    docker = Docker()
    docker.start()
    env = {}
    try:
        image = build(args.skip_build)
        env = {**os.environ, **STACK_ENV, "SENTIMENT_IMAGE": image, "BASE_IMAGE": BASE_IMAGE}
        check_image(image)
        check_stack(image, env)
    finally:
        if env and not args.keep:
            step("teardown")
            subprocess.run([*COMPOSE, "logs", "--tail", "20"], cwd=ROOT, env=env)
            subprocess.run([*COMPOSE, "down", "-v", "--remove-orphans"], cwd=ROOT, env=env)
        if not args.keep:
            docker.stop()
        print("\n== results")
        for name, outcome in RESULTS:
            print(f"   {name}: {outcome}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
