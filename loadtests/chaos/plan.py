"""The chaos run's two profiles: how many users, how long, and the faults' timeline."""

from __future__ import annotations

from dataclasses import dataclass

# The faults, in the order they are injected (faults.py holds what each one does).
REDIS_HANG = "redis-hang"
REDIS_KILL = "redis-kill"
POSTGRES_STOP = "postgres-stop"
POSTGRES_BLACKHOLE = "postgres-blackhole"
WORKER_KILL = "worker-kill"
SERVICE_RESTART = "service-restart"

DESCRIPTIONS = {
    REDIS_HANG: "Redis SIGSTOPped, then SIGCONT",
    REDIS_KILL: "Redis SIGKILLed, restarted on the same port",
    POSTGRES_STOP: "PostgreSQL stopped with `pg_ctl stop -m immediate`, then started",
    POSTGRES_BLACKHOLE: "the postmaster and all its backends SIGSTOPped, then SIGCONT",
    WORKER_KILL: "one BentoML worker SIGKILLed; the window ends when its replacement is ready",
    SERVICE_RESTART: "`bentoml serve` SIGTERMed, then started again with the same env and SPILL_DIR",
}


@dataclass(frozen=True)
class Fault:
    name: str
    at_s: float  # planned start, seconds after the load started (later if the previous one ran late)
    hold_s: float = 0  # how long the server stays stopped, hung or down


@dataclass(frozen=True)
class Profile:
    name: str
    users: int
    spawn_rate: float
    duration_s: float  # the load's planned length
    tail_s: float  # load kept going at least this long after the last fault ended
    faults: tuple[Fault, ...]
    drain_timeout_s: float = 120  # waiting for the analytics rows after the load


FULL = Profile(
    "full",
    users=80,
    spawn_rate=20,
    duration_s=180,
    tail_s=15,
    faults=(
        Fault(REDIS_HANG, 15, 15),
        Fault(REDIS_KILL, 40, 5),
        Fault(POSTGRES_STOP, 55, 25),
        Fault(POSTGRES_BLACKHOLE, 90, 20),
        Fault(WORKER_KILL, 120),
        Fault(SERVICE_RESTART, 140),
    ),
)

QUICK = Profile(
    "quick",
    users=10,
    spawn_rate=10,
    duration_s=60,
    tail_s=5,
    faults=(
        Fault(REDIS_HANG, 5, 5),
        Fault(REDIS_KILL, 13, 2),
        Fault(POSTGRES_STOP, 18, 8),
        Fault(POSTGRES_BLACKHOLE, 29, 6),
        Fault(WORKER_KILL, 38),
        Fault(SERVICE_RESTART, 44),
    ),
    drain_timeout_s=60,
)

PROFILES = {p.name: p for p in (FULL, QUICK)}
