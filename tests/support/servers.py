"""Throwaway Redis and PostgreSQL servers for the tests and the load tests, from the local binaries.

Each lives in a temporary folder on a free loopback port and dies with the test session.
Fault tests stop and restart these, never a server the machine runs for anyone else.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil

from tests.support.serving import ROOT, Managed, Served, free_port


def _wait_port(port: int, up: bool, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            is_up = s.connect_ex(("127.0.0.1", port)) == 0
        if is_up == up:
            return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} did not go {'up' if up else 'down'} in {timeout} s")


class RedisServer(Managed):
    """redis-server on a free port, keeping nothing on disk."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: install the redis-server package (.ci/run does)")
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sentiment-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen([*args, "--dir", str(self.dir)], stdout=subprocess.DEVNULL)
        _wait_port(self.port, up=True)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None
            _wait_port(self.port, up=False)


@contextmanager
def scratch_database(server_url: str, prefix: str, keep: bool = False) -> Iterator[str]:
    """A new database named `prefix` and a random suffix on the PostgreSQL at `server_url`,
    empty; its URL, and the database dropped at the end unless `keep`."""
    import sqlalchemy as sa

    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        if keep:
            print(f"kept database {name}")
        else:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


class PostgresServer(Managed):
    """A fresh PostgreSQL cluster on a free port. initdb refuses to run as root, so when the
    tests run as root the cluster belongs to the `postgres` user (runuser)."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            raise RuntimeError("PostgreSQL binaries not found: install the postgresql package (.ci/run does)")
        self.bin = Path(found[-1]).parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sentiment-pg-"))
        self.data = self.dir / "data"
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self._initialised = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> PostgresServer:
        if not self._initialised:
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
            self._initialised = True
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start")
        _wait_port(self.port, up=True)
        return self

    def pid(self) -> int:
        """The postmaster's pid (its children are the backends)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Every process of the server stopped with SIGSTOP (connections stay open and never
        answer), resumed on exit. The postmaster goes first, so it forks nothing more; then its
        children until a pass finds no new one (a backend or autovacuum worker forked while
        the first list was read would otherwise go on answering)."""
        postmaster = psutil.Process(self.pid())
        postmaster.suspend()
        stopped = [postmaster]
        try:
            while fresh := [c for c in postmaster.children(recursive=True) if c not in stopped]:
                for child in fresh:
                    with suppress(psutil.NoSuchProcess):
                        child.suspend()
                        stopped.append(child)
            yield
        finally:
            for process in reversed(stopped):
                with suppress(psutil.NoSuchProcess):
                    process.resume()

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m <mode>`: `fast` rolls back and shuts down cleanly; `immediate`
        kills every backend at once, as a crash would (crash recovery at the next start)."""
        if not (self.data / "postmaster.pid").exists():
            return  # not running
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
        _wait_port(self.port, up=False)


def serve_on_backends(
    out: Path, started: list[Managed], env: dict[str, str], workers: int | None, source: Path = ROOT
) -> tuple[Served, RedisServer, PostgresServer]:
    """Throwaway Redis and PostgreSQL, then `bentoml serve` on them: REDIS_URL, DATABASE_URL and
    a SPILL_DIR in `out` (its log there too), `env` on top. Each server is appended to `started`
    before its start, so the caller stops a failed start's servers too. The load tests and the
    chaos run start their stacks with it."""
    redis_server = RedisServer()
    started.append(redis_server)
    redis_server.start()
    postgres = PostgresServer()
    started.append(postgres)
    postgres.start()
    settings = {"REDIS_URL": redis_server.url, "DATABASE_URL": postgres.url, "SPILL_DIR": str(out / "spill"), **env}
    served = Served(settings, out / "serve.log", workers=workers, source=source)
    started.append(served)
    served.start(timeout=300)
    return served, redis_server, postgres
