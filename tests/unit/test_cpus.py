"""models/cpus.py on each shape of cgroup files: v2 with a quota or `max`, v1 with a quota or
-1, a quota set on a parent, none at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models import cpus


def _tree(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "proc-cgroup").write_text(proc)
    return root, tmp_path / "proc-cgroup"


@pytest.fixture
def many_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))


@pytest.mark.parametrize(
    ("proc", "files", "expected"),
    [
        ("0::/\n", {"cpu.max": "100000 100000\n"}, (1, "cgroup v2 cpu.max")),
        ("0::/\n", {"cpu.max": "150000 100000\n"}, (2, "cgroup v2 cpu.max")),  # 1.5 CPUs: two threads
        ("0::/\n", {"cpu.max": "max 100000\n"}, (32, "affinity")),
        # the pod's quota on a parent of the container's cgroup
        (
            "0::/kubepods/pod1/ctr\n",
            {"kubepods/pod1/cpu.max": "200000 100000", "kubepods/pod1/ctr/cpu.max": "max 100000"},
            (2, "cgroup v2 cpu.max"),
        ),
        (
            "4:cpu,cpuacct:/\n1:memory:/\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "100000", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            (1, "cgroup v1 cpu.cfs_quota_us"),
        ),
        (
            "4:cpu,cpuacct:/\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            (32, "affinity"),
        ),
        ("", {}, (32, "affinity")),  # no cgroup file at all
    ],
)
def test_the_cpus_are_the_affinity_lowered_to_the_cgroup_quota(
    many_cpus: None, tmp_path: Path, proc: str, files: dict[str, str], expected: tuple[int, str]
) -> None:
    root, proc_cgroup = _tree(tmp_path, proc, files)
    share = cpus.available(root, proc_cgroup)
    assert (share.cpus, share.source) == expected


def test_an_affinity_below_the_quota_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # taskset -c 0
    root, proc_cgroup = _tree(tmp_path, "0::/\n", {"cpu.max": "400000 100000"})
    assert cpus.available(root, proc_cgroup) == cpus.CpuShare(1, "affinity")
