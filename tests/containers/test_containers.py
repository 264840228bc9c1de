"""`make test-containers`: the image and the air-gapped stack, built and checked for real.

    make test-containers      # pytest -m containers tests/containers -s

1. A Docker engine of its own (`dockerd --bridge=none --iptables=false`: no bridge, no
   firewall rules; every container on the host network, traffic on loopback), unless one
   already answers; it is stopped at the end only if these tests started it.
2. The local base image from Debian packages (deploy/base-image.sh) and the service image
   (deploy/image.py, the full models inside when the BentoML store has them, else the quick ones).
3. The image alone (`docker run --network host`, embedded cache and SQLite): every contract
   check of tests/support/contract.py.
   Run under `--cpus=1` and `--cpus=2`, it sizes its workers and threads by that quota.
4. The stack: compose.yaml with compose.airgap.yaml and REPLICAS replicas (three, from
   deploy/replicas.py, as `make up REPLICAS=3 STACK=airgap` runs it) behind nginx, Redis,
   PostgreSQL, the migration, Prometheus: one rate limit and one cache shared by every replica
   through the balancer, the internal paths refused by nginx, rows in the stack's PostgreSQL
   written by a role that cannot change the schema, every target up in Prometheus; then the quick
   load-test profile through nginx, its requests spread evenly over the replicas.
5. The previous release's image (built from the commit CHANGELOG.md names) beside the stack's
   replicas under load, then stopped: a job it took finishes on this release's replicas.
6. Everything torn down (volumes included); KEEP_STACK=1 leaves it running.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import USER_BENTOML_HOME
from tests.support import contract, releases
from tests.support.serving import ROOT, post_retrying_sheds, wait_ready

pytestmark = [pytest.mark.containers, pytest.mark.integration, pytest.mark.slow]

BASE_IMAGE = os.environ.get("BASE_IMAGE", "sentiment-base:bookworm")
PROJECT = "sentiment-airgap-test"
REPLICAS = 3
REPLICA_URLS = [f"http://127.0.0.1:{3100 + i}" for i in range(1, REPLICAS + 1)]
STACK_DIR = ROOT / "var" / "stack-test"  # deploy/replicas.py's files for REPLICAS
COMPOSE = ["docker-compose", "-p", PROJECT, "-f", "compose.yaml", "-f", "compose.airgap.yaml"]
COMPOSE += ["-f", str(STACK_DIR / "compose.replicas.yaml"), "-f", str(STACK_DIR / "compose.replicas.airgap.yaml")]
# The stack's secrets, written to files as deploy/secrets.sh does (SECRETS_DIR), and the test's
# own settings; the values are random so the test can look for them where they must not be.
SECRETS = {
    "redis_password": f"r-{uuid.uuid4().hex}",
    "postgres_password": f"p-{uuid.uuid4().hex}",
    "postgres_app_password": f"q-{uuid.uuid4().hex}",
    "admin_api_key": uuid.uuid4().hex + uuid.uuid4().hex,  # the service refuses keys under 32 characters
    "grafana_admin_password": f"g-{uuid.uuid4().hex}",
}
STACK_ENV = {"RATE_LIMIT_PREDICT": "100/minute"}
RESULTS: list[tuple[str, str]] = []
KEEP = os.environ.get("KEEP_STACK") == "1"


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
            raise RuntimeError("dockerd not found: install docker.io (make test-containers does)")
        log = (ROOT / "var" / "dockerd.log").open("ab")
        self.proc = subprocess.Popen(
            ["dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false"], stdout=log, stderr=log
        )
        deadline = time.monotonic() + 60
        while not self.answers():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("dockerd did not start: see var/dockerd.log")
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
    user = {**os.environ, "BENTOML_HOME": USER_BENTOML_HOME}
    have = [
        subprocess.run([bentoml, "models", "get", f"{name}:latest"], capture_output=True, env=user).returncode == 0
        for name in ("sentiment-minilm", "sentiment-minilm-int8")
    ]
    if all(have):
        record("models", "the full models of the BentoML store")
        return {"BENTOML_HOME": USER_BENTOML_HOME}
    env = {"BENTOML_HOME": str(ROOT / "var" / "bentoml-quick")}
    step("no full models in the store: the quick profile, into var/bentoml-quick")
    sh([sys.executable, "-m", "models.build", "--profile", "quick"], env={**os.environ, **env})
    record("models", "quick profile (var/bentoml-quick): the store had no full models")
    return env


def build() -> str:
    image_file = ROOT / "var" / "image"
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


def _answer(url: str, text: str, client: str) -> int:
    """The status of /predict, a shed retried: for a cached text only the door guards shed,
    before the limiter is asked, so a retry spends no slot."""
    return post_retrying_sheds(f"{url}/predict", {"text": text}, {"X-Forwarded-For": client}).status_code


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    (ROOT / "var").mkdir(exist_ok=True)
    engine = Docker()
    engine.start()
    try:
        yield engine
    finally:
        if not KEEP:
            engine.stop()
        print("\n== results")
        for name, outcome in RESULTS:
            print(f"   {name}: {outcome}")


@pytest.fixture(scope="module")
def image(docker: Docker) -> str:
    return build()


@pytest.fixture(scope="module")
def served_image(image: str) -> Iterator[str]:
    """The image alone, on the host network: its URL."""
    step("the image alone")
    name = f"sentiment-contract-{uuid.uuid4().hex[:6]}"
    port = 3055
    sh(["docker", "run", "-d", "--rm", "--network", "host", "--name", name, image, "serve", "--port", str(port)])
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", "the image", 300, interval=1)
        yield name
    finally:
        subprocess.run(["docker", "logs", "--tail", "30", name], cwd=ROOT)
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


@pytest.fixture(scope="module")
def stack(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The air-gapped stack, up, nginx terminating TLS on 127.0.0.1:8443 with a self-signed
    certificate made here: the environment it was started with."""
    step("air-gapped stack: compose.yaml + compose.airgap.yaml, TLS on")
    tls = tmp_path_factory.mktemp("tls")
    sh(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tls / "key.pem"), "-out", str(tls / "cert.pem")],
        capture_output=True,
    )
    conf = (ROOT / "deploy" / "nginx" / "tls.conf.example").read_text()
    (tls / "tls.conf").write_text(conf.replace("listen 8443 ssl;", "listen 127.0.0.1:8443 ssl;"))
    for path in (tls, *tls.iterdir()):  # nginx runs as www-data in the air-gapped stack
        path.chmod(0o755 if path.is_dir() else 0o644)
    secrets = tmp_path_factory.mktemp("secrets")
    for name, value in SECRETS.items():
        (secrets / name).write_text(value + "\n")
    sh(["sh", "deploy/secrets.sh", str(secrets)])  # keeps the files, sets their modes
    env = {
        **os.environ,
        **STACK_ENV,
        "SENTIMENT_IMAGE": image,
        "BASE_IMAGE": BASE_IMAGE,
        "TLS_DIR": str(tls),
        "SECRETS_DIR": str(secrets),
    }
    sh([sys.executable, "deploy/replicas.py", str(REPLICAS), "--out", str(STACK_DIR)])
    started = time.monotonic()
    try:
        sh([*COMPOSE, "build"], env=env)
        sh([*COMPOSE, "up", "-d"], env=env)
        wait_ready("http://127.0.0.1:8080/readyz", "the stack", 400, interval=1)
        for url in REPLICA_URLS:  # nginx is up once one replica is: wait for every one
            wait_ready(f"{url}/readyz", url, 400, interval=1)
        record("stack up", f"{REPLICAS} replicas in {time.monotonic() - started:.0f} s")
        yield env
    finally:
        if not KEEP:
            step("teardown")
            subprocess.run([*COMPOSE, "logs", "--tail", "20"], cwd=ROOT, env=env)
            subprocess.run([*COMPOSE, "down", "-v", "--remove-orphans"], cwd=ROOT, env=env)


def test_image_runs_as_a_user_with_cpu_torch(served_image: str) -> None:
    user = sh(["docker", "exec", served_image, "id", "-u"], capture_output=True).stdout.strip()
    torch = sh(
        ["docker", "exec", served_image, "python", "-c", "import torch; print(torch.__version__)"], capture_output=True
    ).stdout.strip()
    assert user != "0", "the server runs as root"
    assert torch.endswith("+cpu"), torch
    record("non-root user, CPU torch", f"uid {user}, torch {torch}")


def test_image_passes_every_contract_check(served_image: str) -> None:
    url = "http://127.0.0.1:3055"
    health = httpx.get(f"{url}/health", timeout=10).json()
    results = contract.run(url)
    failed = [(n, p) for n, p in results if p]
    assert not failed, failed
    record("contract checks on the image", f"{len(results)} of {len(results)} passed; models {health['model']}")


@pytest.mark.parametrize("cpus", [1, 2])
def test_image_sizes_its_workers_and_threads_by_its_cpu_quota(image: str, cpus: int) -> None:
    """`docker run --cpus=N` sets a CFS quota, not the CPUs the container sees: the service reads
    the quota (models/cpus.py) and starts N workers of one inference thread each."""
    name = f"sentiment-cpus-{cpus}-{uuid.uuid4().hex[:6]}"
    port = 3056
    run = ["docker", "run", "-d", "--rm", "--network", "host", f"--cpus={cpus}", "--name", name, image]
    sh([*run, "serve", "--port", str(port)])
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", f"the image under --cpus={cpus}", 300, interval=1)
        model = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["model"]
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    assert (model["workers"], model["inference_threads"], model["threads"]) == (cpus, 1, 1), model
    assert model["cpus"]["available"] == cpus, model
    if cpus < len(os.sched_getaffinity(0)):  # the quota, not the host's CPUs, decided
        assert model["cpus"]["from"].startswith("cgroup"), model
    record(
        f"--cpus={cpus}",
        f"{model['workers']} worker(s) x {model['inference_threads']} inference thread, from {model['cpus']}",
    )


def test_stack_has_one_rate_limit_through_nginx(stack: dict[str, str]) -> None:
    client = f"198.18.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"
    text = f"Shared limits across replicas {uuid.uuid4().hex[:6]}"
    assert _answer("http://127.0.0.1:8080", text, "198.18.255.1") == 200  # cached from here on
    with cf.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda _: _answer("http://127.0.0.1:8080", text, client), range(200)))
    assert codes.count(200) == 100 and codes.count(429) == 100, {c: codes.count(c) for c in set(codes)}
    record("one rate limit through nginx", "exactly 100 x 200 and 100 x 429 of 200 at 100/minute")


def test_stack_nginx_refuses_the_internal_paths(stack: dict[str, str]) -> None:
    refused = {}
    for path in ("/metrics", "/docs.json", "/docs", "/internal/infer", "//metrics", "/%6detrics"):
        r = httpx.get(f"http://127.0.0.1:8080{path}", timeout=10)
        refused[path] = r.status_code
        assert r.status_code in (403, 404) and "sentiment_" not in r.text and "openapi" not in r.text, (path, r.text)
    direct = httpx.get("http://127.0.0.1:3101/metrics", timeout=10)
    assert direct.status_code == 200 and "sentiment_http_requests_total" in direct.text  # what Prometheus scrapes
    record(
        "internal paths through nginx",
        ", ".join(f"{p} {c}" for p, c in refused.items()) + "; /metrics on a replica 200",
    )


def test_stack_terminates_tls_and_keeps_each_clients_limit(stack: dict[str, str]) -> None:
    """HTTPS through nginx with the stack's certificate; a load balancer's X-Forwarded-For
    through it still names the client, each with a rate limit of its own."""
    import ssl

    trusted = ssl.create_default_context(cafile=str(Path(stack["TLS_DIR"]) / "cert.pem"))
    text = f"Over TLS {uuid.uuid4().hex[:6]}"
    remaining = {}
    with httpx.Client(base_url="https://127.0.0.1:8443", verify=trusted, timeout=30) as https:
        for client in ("198.18.201.1", "198.18.201.1", "198.18.201.2"):
            r = https.post("/predict", json={"text": text}, headers={"X-Forwarded-For": client})
            assert r.status_code == 200, r.text
            remaining.setdefault(client, []).append(r.headers["RateLimit"].split("remaining=")[1].split(",")[0])
    first, second = remaining["198.18.201.1"]
    assert first != second and remaining["198.18.201.2"] == [first]  # counted per client
    with pytest.raises(httpx.ConnectError):  # the certificate is checked: no plain TLS trust
        httpx.get("https://127.0.0.1:8443/health", timeout=10)
    record("TLS at nginx", f"HTTPS 200 on 127.0.0.1:8443, per-client limits kept (remaining {first}, {second})")


def test_stack_listens_on_loopback_only(stack: dict[str, str]) -> None:
    """On the host network, every service of the stack binds 127.0.0.1: nothing reaches the
    replicas (their /metrics and /docs included), Redis or PostgreSQL around nginx."""
    import psutil

    ports = {
        8080: "nginx",
        8443: "nginx TLS",
        **{3100 + i: f"api-{i}" for i in range(1, REPLICAS + 1)},
        6390: "redis",
        5440: "postgres",
        9091: "prometheus",
    }
    listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    bound = {(ports[c.laddr.port], c.laddr.ip) for c in listening if c.laddr.port in ports}
    assert {name for name, _ in bound} == set(ports.values()), bound
    assert all(ip in ("127.0.0.1", "::1") for _, ip in bound), bound
    record("listening addresses", ", ".join(sorted(f"{name} {ip}" for name, ip in bound)))


def test_stack_runs_hardened_with_secrets_only_in_files(stack: dict[str, str]) -> None:
    """Every container of the stack: no capabilities, no privilege gain, a read-only root, a
    memory limit, a user other than root; no secret in its environment, its configuration's
    command or any of its processes' command lines; the secrets readable in /run/secrets."""
    names = sh([*COMPOSE, "ps", "-q"], env=stack, capture_output=True).stdout.split()
    assert len(names) >= REPLICAS + 4, names  # the replicas, nginx, Redis, PostgreSQL, Prometheus (migrate exited)
    seen = {}
    for cid in names:
        [info] = json.loads(sh(["docker", "inspect", cid], capture_output=True).stdout)
        name, host, config = info["Name"].lstrip("/"), info["HostConfig"], info["Config"]
        if not info["State"]["Running"]:
            continue
        assert host["CapDrop"] == ["ALL"] and not host["CapAdd"], (name, host["CapDrop"], host["CapAdd"])
        assert "no-new-privileges:true" in (host["SecurityOpt"] or []), (name, host["SecurityOpt"])
        assert host["ReadonlyRootfs"], name
        assert host["Memory"] > 0 and host["NanoCpus"] > 0, (name, host["Memory"], host["NanoCpus"])
        uid = sh(["docker", "exec", cid, "id", "-u"], capture_output=True).stdout.strip()
        assert uid != "0", f"{name} runs as root"
        # ps options in BSD style: docker's own parser takes "-o"; docker needs the pid column
        processes = sh(["docker", "top", cid, "axo", "pid,args"], capture_output=True).stdout
        exposed = "\n".join([*(config["Env"] or []), *(config["Cmd"] or []), *(config["Entrypoint"] or []), processes])
        leaked = [key for key, value in SECRETS.items() if value in exposed]
        assert not leaked, (name, leaked)
        seen[name] = cid
    [api] = [cid for name, cid in seen.items() if "api-1" in name]
    key = sh(["docker", "exec", api, "cat", "/run/secrets/admin_api_key"], capture_output=True).stdout.strip()
    assert key == SECRETS["admin_api_key"]
    record("hardened containers", f"{len(seen)} running: no capabilities or root, read-only, limited, no secret seen")


def test_stack_has_one_cache_and_stores_every_replicas_rows(stack: dict[str, str]) -> None:
    import sqlalchemy as sa

    text = f"A cache shared by every replica {uuid.uuid4().hex[:6]}"
    first, *others = [httpx.post(f"{url}/predict", json={"text": text}, timeout=60).json() for url in REPLICA_URLS]
    assert first["cached"] is False and all(o["cached"] is True for o in others), (first, others)
    record("one cache", f"predicted on replica 1, a cache hit on the other {len(others)}")
    url = f"postgresql+psycopg://sentiment:{SECRETS['postgres_password']}@127.0.0.1:5440/sentiment"
    engine = sa.create_engine(url)
    ids: list[str] = [first["request_id"], *(o["request_id"] for o in others)]
    deadline = time.monotonic() + 30
    try:
        while True:  # rows are written by each replica's writer thread, within a second or so
            with engine.connect() as conn:
                found = conn.exec_driver_sql(
                    "SELECT count(*) FROM predictions WHERE request_id = ANY(%s)", (ids,)
                ).scalar_one()
            if found == len(ids) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        engine.dispose()
    assert found == len(ids), found
    record("rows in the stack's PostgreSQL", f"all {len(ids)} replicas' rows present")


def test_stack_replicas_write_as_a_role_that_cannot_change_the_schema(stack: dict[str, str]) -> None:
    import sqlalchemy as sa

    owner = sa.create_engine(f"postgresql+psycopg://sentiment:{SECRETS['postgres_password']}@127.0.0.1:5440/sentiment")
    app = sa.create_engine(
        f"postgresql+psycopg://sentiment_app:{SECRETS['postgres_app_password']}@127.0.0.1:5440/sentiment"
    )
    deadline = time.monotonic() + 30
    try:
        # The replicas' analytics writers keep their pooled connections: whose are they? (The
        # previous test's own connection may take a moment to leave the list.)
        while True:
            with owner.connect() as conn:
                users = (
                    conn.exec_driver_sql(
                        "SELECT DISTINCT usename FROM pg_stat_activity"
                        " WHERE datname = 'sentiment' AND pid <> pg_backend_pid()"
                    )
                    .scalars()
                    .all()
                )
            if users == ["sentiment_app"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        with app.connect() as conn:
            superuser = conn.exec_driver_sql("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").scalar_one()
            rows = conn.exec_driver_sql("SELECT count(*) FROM predictions").scalar_one()
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"), app.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE intruder (id int)")
    finally:
        owner.dispose()
        app.dispose()
    assert users == ["sentiment_app"], users
    assert superuser is False and rows > 0, (superuser, rows)
    replicas = [f"api-{i}" for i in range(1, REPLICAS + 1)]
    logs = sh([*COMPOSE, "logs", "--no-color", *replicas], env=stack, capture_output=True).stdout
    assert "migrations not applied" not in logs  # each replica's start-up upgrade found the schema at head
    record("application role", f"replicas connect as {users[0]}, {rows} rows readable, CREATE TABLE refused")


def test_stack_prometheus_scrapes_every_replica(stack: dict[str, str]) -> None:
    def all_up(r: httpx.Response) -> bool:
        targets = r.json()["data"]["activeTargets"]
        return len(targets) == REPLICAS and all(t["health"] == "up" for t in targets)

    wait_ready("http://127.0.0.1:9091/api/v1/targets", "every Prometheus target", 60, ok=all_up, interval=1)
    scraped = httpx.get(
        "http://127.0.0.1:9091/api/v1/query", params={"query": "sentiment_saturation{signal='queue_delay'}"}, timeout=10
    ).json()["data"]["result"]
    assert sorted(r["metric"]["instance"] for r in scraped) == sorted(u.removeprefix("http://") for u in REPLICA_URLS)
    admin = {"Authorization": f"Bearer {SECRETS['admin_api_key']}"}
    summary = httpx.get("http://127.0.0.1:8080/analytics/summary", headers=admin, timeout=10)
    assert summary.status_code == 200 and summary.json()["total"] > 0, summary.text
    record(
        "Prometheus, analytics",
        f"{REPLICAS} targets up, each one's saturation scraped; {summary.json()['total']} predictions in the last hour",
    )


def test_stack_answers_bentomls_clients_through_nginx(stack: dict[str, str]) -> None:
    """BentoML's SyncHTTPClient and AsyncHTTPClient through nginx (/schema.json, /readyz and the
    three APIs pass it): the same labels and probabilities as plain HTTP, the contract's 400."""
    results = contract.run("http://127.0.0.1:8080", only=["bentoml_clients"])
    assert results and all(problem is None for _, problem in results), results
    record("BentoML's clients through nginx", "predict, predict_ab, batch: the answers of plain HTTP; 400 kept")


def test_stack_scores_a_file_with_the_client_through_nginx(stack: dict[str, str], tmp_path: Path) -> None:
    """`sentiment-client score` on 10,000 lines, over 2 MB (nginx's cap on other bodies), through
    nginx: one result per line in input order, each the label the service gives the text."""
    step("sentiment-client score: 10,000 lines through nginx")
    subjects = ["The battery", "Customer support", "The delivery", "This blender", "The hotel room", "The plot"]
    verdicts = ["was wonderful", "broke after two days", "exceeded my hopes", "was a waste of money", "is fine"]
    texts = [
        f"{subjects[i % 6]} {verdicts[i % 5]}, review {i}. " + "Details follow in a long paragraph. " * 7
        for i in range(10_000)
    ]
    source, results = tmp_path / "reviews.jsonl", tmp_path / "results.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert source.stat().st_size > 2 * 2**20
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "sentiment_client", "score", str(source), "--out", str(results)]
        + ["--url", "http://127.0.0.1:8080"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "client")},
        cwd=tmp_path,
    )
    seconds = time.monotonic() - started
    shown = [line for line in run.stderr.replace("\r", "\n").splitlines() if line.strip()]
    print("\n".join(shown[:3] + ["..."] + shown[-4:]), flush=True)  # the progress bar's states
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["index"] for r in lines] == list(range(len(texts)))
    for i in (0, 1, 4_321, 9_999):  # the service's own answer for the text, from its shared cache
        r = httpx.post("http://127.0.0.1:8080/predict", json={"text": texts[i]}, timeout=30)
        assert r.status_code == 200 and r.json()["label"] == lines[i]["label"], (i, r.text, lines[i])
    size = source.stat().st_size / 2**20
    record("client through nginx", f"{len(lines):,} results in order, {size:.1f} MB in, {seconds:.0f} s")


def _requests_answered(url: str) -> int:
    """Prediction requests a replica has answered (any status), from its /metrics."""
    total = 0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        predictions = 'endpoint="/predict' in line or 'endpoint="/batch"' in line
        if line.startswith("sentiment_http_requests_total{") and predictions:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def test_stack_takes_the_quick_load_test_through_nginx(stack: dict[str, str]) -> None:
    step("quick load-test profile through nginx")
    out = ROOT / "var" / "loadtests" / "stack"
    shutil.rmtree(out, ignore_errors=True)
    before = [_requests_answered(url) for url in REPLICA_URLS]
    sh(
        [sys.executable, "-m", "loadtests.run", "all", "--profile", "quick", "--url", "http://127.0.0.1:8080"]
        + ["--out", str(out), "--no-thresholds"],
        env={**os.environ, "ADMIN_API_KEY": SECRETS["admin_api_key"]},
    )
    per_replica = [_requests_answered(url) - b for url, b in zip(REPLICA_URLS, before, strict=True)]
    reports = sorted(out.glob("*/report.md"))
    assert reports, f"no report under {out}"
    even = sum(per_replica) / REPLICAS
    assert even > 100 and all(abs(n - even) <= 0.1 * even for n in per_replica), per_replica
    record("spread over the replicas", f"prediction requests {per_replica}: within 10% of {even:.0f} each")
    record("quick load test through nginx", f"{len(reports)} reports in {out.relative_to(ROOT)}/<scenario>/report.md")


@pytest.fixture(scope="module")
def release_image(docker: Docker) -> str:
    """The previous release's image (CHANGELOG.md names its commit), built from that commit's
    tree by its own deploy/image.py, with the same models."""
    release = releases.previous()
    step(f"the previous release's image: {release.version}, commit {release.commit}")
    tree = ROOT / "var" / f"release-{release.version}"
    shutil.rmtree(tree, ignore_errors=True)
    releases.checkout(release, tree, ".")
    if (ROOT / "var" / "wheels").is_dir():  # the torch wheel deploy/image.py fetched for this image
        shutil.copytree(ROOT / "var" / "wheels", tree / "var" / "wheels")
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "deploy/image.py", "--name", "sentiment-release", "--base-image", BASE_IMAGE],
        cwd=tree,
        env={**os.environ, **models_env()},
        check=True,
        text=True,
    )
    image = (tree / "var" / "image").read_text().strip()
    record("previous release's image", f"{image} ({release.version}), built in {time.monotonic() - started:.0f} s")
    return image


def _release_replica(image: str, port: int, out: Path) -> Path:
    """A compose override adding `api-release`: a replica of the air-gapped stack (as
    deploy/replicas.py writes them) running `image` on `port`."""
    from deploy import replicas

    replica = {**replicas._service("compose.yaml", "api-1"), **replicas.airgap_replica(port)}
    replica["image"] = image
    replica["volumes"] = ["spill-release:/home/bentoml/spill", "/tmp"]
    out.write_text(json.dumps({"services": {"api-release": replica}, "volumes": {"spill-release": {}}}))
    return out


def test_the_previous_release_and_this_one_serve_together_and_a_job_crosses_the_switch(
    stack: dict[str, str], release_image: str, tmp_path: Path
) -> None:
    """The previous release's image beside this one's replicas, on the stack's PostgreSQL and
    Redis, under load on both: no 5xx but sheds, a row per answer, one cache across versions; a
    job submitted to the old replica before it is stopped (the switch) finishes after it, on
    this release's replicas, with one result per text, in order."""
    step("the previous release beside this one, then switched off")
    port = 3109
    compose = [*COMPOSE, "-f", str(_release_replica(release_image, port, tmp_path / "release.yaml"))]
    sh([*compose, "up", "-d", "--no-deps", "api-release"], env=stack)
    try:
        _old_beside_new(compose, stack, port)
    finally:
        subprocess.run([*compose, "rm", "-sf", "api-release"], cwd=ROOT, env=stack, capture_output=True)
        subprocess.run(["docker", "volume", "rm", "-f", f"{PROJECT}_spill-release"], capture_output=True)


def _old_beside_new(compose: list[str], stack: dict[str, str], port: int) -> None:
    import sqlalchemy as sa

    old, new = f"http://127.0.0.1:{port}", "http://127.0.0.1:8080"
    wait_ready(f"{old}/readyz", "the previous release's replica", 400, interval=1)
    version = httpx.get(f"{old}/health", timeout=10).json()["version"]
    this = httpx.get(f"{REPLICA_URLS[0]}/health", timeout=10).json()["version"]
    assert version == releases.previous().version and this != version, (version, this)

    shared = f"One cache across releases {uuid.uuid4().hex[:6]}"
    first = httpx.post(f"{old}/predict", json={"text": shared}, timeout=60).json()
    again = httpx.post(f"{new}/predict", json={"text": shared}, timeout=60).json()
    assert first["cached"] is False and again["cached"] is True and again["label"] == first["label"], (first, again)

    texts = [f"Review {i}: {'loved it' if i % 3 else 'returned it the next day'}." for i in range(3_000)]
    submitted = httpx.post(f"{old}/jobs", json={"texts": texts}, timeout=60)
    assert submitted.status_code == 202, submitted.text
    job, token = submitted.json()["job_id"], submitted.json()["token"]
    auth = {"Authorization": f"Bearer {token}"}

    statuses: dict[str, dict[int, int]] = {old: {}, new: {}}
    answered: list[str] = []
    stop_at = [time.monotonic() + 600.0]
    run = uuid.uuid4().hex[:6]

    def client(n: int) -> None:
        url = old if n % 2 else new
        with httpx.Client(timeout=60) as http:
            i = 0
            while time.monotonic() < stop_at[0]:
                i += 1
                try:
                    r = http.post(
                        f"{url}/predict",
                        json={"text": f"Upgrade traffic {run} {n} {i}"},
                        headers={"X-Forwarded-For": f"198.18.{100 + n}.{i % 250}"},
                    )
                except httpx.TransportError:  # the old replica stopping: its connections refused
                    if url == old:
                        url = new  # a client's retry goes to what still serves
                        continue
                    raise
                statuses[url][r.status_code] = statuses[url].get(r.status_code, 0) + 1
                if r.status_code == 200:
                    answered.append(r.json()["request_id"])
                else:
                    assert r.status_code == 503 and r.headers.get("Retry-After"), (url, r.status_code, r.text)
                time.sleep(0.05)

    with cf.ThreadPoolExecutor(8) as pool:
        load = [pool.submit(client, n) for n in range(8)]
        time.sleep(5)  # both releases serving, the job under way
        before = httpx.get(f"{new}/jobs/{job}", headers=auth, timeout=30).json()
        assert before["status"] in ("queued", "running") and before["done"] < len(texts), before
        sh([*compose, "stop", "-t", "60", "api-release"], env=stack)  # the switch: SIGTERM, then gone
        stop_at[0] = time.monotonic() + 10  # a little more traffic on this release's replicas alone
        for f in load:
            f.result()
    deadline = time.monotonic() + 600  # jobs run on idle capacity: the load is over
    while (status := httpx.get(f"{new}/jobs/{job}", headers=auth, timeout=30).json())["status"] != "done":
        assert status["status"] in ("queued", "running") and time.monotonic() < deadline, status
        time.sleep(2)
    results = [
        json.loads(line) for line in httpx.get(f"{new}/jobs/{job}/results", headers=auth, timeout=60).text.splitlines()
    ]
    assert [r["index"] for r in results] == list(range(len(texts)))
    codes = {url: dict(sorted(s.items())) for url, s in statuses.items()}
    assert not any(code >= 500 and code != 503 for s in statuses.values() for code in s), codes
    assert statuses[old].get(200, 0) > 0 and statuses[new].get(200, 0) > 0, codes

    engine = sa.create_engine(f"postgresql+psycopg://sentiment:{SECRETS['postgres_password']}@127.0.0.1:5440/sentiment")
    deadline = time.monotonic() + 60
    try:
        while True:  # the writers ship within a second or so; the stopped one flushed on SIGTERM
            with engine.connect() as conn:
                rows = conn.exec_driver_sql(
                    "SELECT count(*) FROM predictions WHERE request_id = ANY(%s)", (answered,)
                ).scalar_one()
            if rows == len(answered) or time.monotonic() > deadline:
                break
            time.sleep(1)
    finally:
        engine.dispose()
    assert rows == len(answered), (rows, len(answered))
    record(
        "previous release beside this one",
        f"{version} and {this} on one PostgreSQL and Redis: answers {codes}, {rows} rows for "
        f"{len(answered)} answers, one cache; a {len(texts):,}-text job at {before['done']} done when the "
        f"old replica stopped finished on the new ones, {len(results):,} results in order",
    )
