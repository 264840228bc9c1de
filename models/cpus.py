"""How many CPUs this process may use: the fewer of its CPU affinity and its cgroup's CPU quota.

`os.cpu_count()` counts the host's cores: a container limited to 2 CPUs on a 32-core node would
size 16 threads per worker, each forward call then throttled by the CFS quota. Written here:
psutil, a dependency already, does not read cgroups; loky's `cpu_count` does, but is not a
dependency of the service, and does not say which limit decided (/health shows it).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class CpuShare:
    """The CPUs to size threads by, and what decided it (shown on /health)."""

    cpus: int
    source: str  # "affinity" or "cgroup v2 cpu.max" / "cgroup v1 cpu.cfs_quota_us"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _ancestors(root: Path, relative: str) -> list[Path]:
    """The cgroup's folder and each parent's up to the root: the tightest quota of them holds."""
    parts = [p for p in relative.split("/") if p]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _quota_v2(root: Path, relative: str) -> float | None:
    quotas = []
    for folder in _ancestors(root, relative):
        text = _read(folder / "cpu.max")  # "max 100000" or "<quota> <period>", in microseconds
        if not text:
            continue
        quota, _, period = text.partition(" ")
        if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
            quotas.append(int(quota) / int(period))
    return min(quotas) if quotas else None


def _quota_v1(root: Path, relative: str) -> float | None:
    quotas = []
    for controller in ("cpu,cpuacct", "cpu"):
        for folder in _ancestors(root / controller, relative):
            quota = _read(folder / "cpu.cfs_quota_us")
            period = _read(folder / "cpu.cfs_period_us")
            # a quota of -1: no limit
            if quota and period and quota.isdigit() and period.isdigit() and int(quota) > 0 and int(period) > 0:
                quotas.append(int(quota) / int(period))
    return min(quotas) if quotas else None


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> tuple[float, str] | None:
    """The CPU quota of this process's cgroup (v2, else v1), in CPUs; None without one."""
    lines = (_read(proc_cgroup) or "").splitlines()
    v2 = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
    if v2 is not None and (quota := _quota_v2(root, v2)) is not None:
        return quota, "cgroup v2 cpu.max"
    for line in lines:
        fields = line.split(":", 2)
        quota = _quota_v1(root, fields[2]) if len(fields) == 3 and "cpu" in fields[1].split(",") else None
        if quota is not None:
            return quota, "cgroup v1 cpu.cfs_quota_us"
    return None


def available(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> CpuShare:
    """The CPUs this process may use: its affinity, lowered to its cgroup's quota (rounded up:
    a quota of 1.5 CPUs keeps two threads busy part of the time)."""
    try:
        cpus, source = len(os.sched_getaffinity(0)), "affinity"
    except (AttributeError, OSError):  # not Linux
        cpus, source = os.cpu_count() or 1, "cpu_count"
    found = cgroup_quota(root, proc_cgroup)
    if found is not None and math.ceil(found[0]) < cpus:
        cpus, source = max(1, math.ceil(found[0])), found[1]
    return CpuShare(max(1, cpus), source)
