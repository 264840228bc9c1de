"""The locks (make lock) cover what pyproject.toml declares, pin every file by hash and torch to
its CPU build; the Bento installs from the runtime lock."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "requirements" / "runtime.txt"
DEV = ROOT / "requirements" / "dev.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _entries(lock: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (pinned version, sha256 digests), from a pip-compile file; fails on any other line."""
    text = re.sub(r"\s*\\\n\s*", " ", lock.read_text())
    entries: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *options = line.split()
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", spec)
        assert match, f"{lock.name}: not an exact pin: {line}"
        assert all(o.startswith("--hash=sha256:") for o in options), f"{lock.name}: {line}"
        entries[canonicalize_name(match[1])] = (match[2], [o.split(":", 1)[1] for o in options])
    return entries


def _image_module():
    spec = importlib.util.spec_from_file_location("image", ROOT / "deploy" / "image.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_covers(lock: Path, declared: list[str]) -> None:
    pins = _entries(lock)
    for line in declared:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock.name} lacks {line}: make lock"
        version = pins[name][0]
        assert req.specifier.contains(version, prereleases=True), f"{lock.name}: {name}=={version} vs {line}"


def test_every_locked_package_is_pinned_with_hashes() -> None:
    for lock in (RUNTIME, DEV):
        entries = _entries(lock)
        assert len(entries) > 50
        unhashed = [name for name, (_, digests) in entries.items() if not digests]
        assert not unhashed, f"{lock.name}: no hashes for {unhashed}"
        assert all(re.fullmatch(r"[0-9a-f]{64}", d) for _, digests in entries.values() for d in digests)


def test_the_locks_cover_pyproject() -> None:
    runtime = PYPROJECT["project"]["dependencies"]
    _assert_covers(RUNTIME, runtime)
    # the venv's lock: the dev extra too, and the build backend the editable install uses unisolated
    _assert_covers(DEV, runtime + PYPROJECT["project"]["optional-dependencies"]["dev"])
    _assert_covers(DEV, PYPROJECT["build-system"]["requires"])
    # dev.txt is resolved under runtime.txt's pins: the venv tests what the image runs
    runtime_pins, dev_pins = _entries(RUNTIME), _entries(DEV)
    assert {n: dev_pins[n][0] for n in runtime_pins} == {n: v for n, (v, _) in runtime_pins.items()}


def test_torch_is_locked_to_its_cpu_build() -> None:
    for lock in (RUNTIME, DEV):
        pins = _entries(lock)
        assert pins["torch"][0] == "2.13.0+cpu", lock.name
        assert not [n for n in pins if n.startswith("nvidia-") and n != "nvidia-ml-py"], "CUDA libraries in the lock"
    # no index or find-links of the machine the lock was made on
    assert not re.search(r"^\s*--(index-url|extra-index-url|find-links)", DEV.read_text() + RUNTIME.read_text(), re.M)


def test_the_bento_installs_the_runtime_lock() -> None:
    python = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]
    assert python["requirements_txt"] == "requirements/runtime.txt"
    assert "packages" not in python and python["lock_packages"] is False
    image = _image_module()
    assert image.bento_config()["python"] == python
    wheel = ROOT / "var" / "wheels" / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    with_wheel = image.bento_config(wheel, "base:1")
    assert with_wheel["python"]["requirements_txt"] == "requirements/runtime.txt"
    assert with_wheel["python"]["wheels"] == ["var/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"]
    # the folder BentoML's image holds the Bento's wheels in
    from bentoml._internal.container.generate import BENTO_PATH

    assert with_wheel["python"]["find_links"] == [f"{BENTO_PATH}/env/python/wheels"]
    assert with_wheel["docker"]["base_image"] == "base:1"
    # the wheel the image carries is checked against the hash the lock records
    assert image.locked_hashes("torch") == set(_entries(RUNTIME)["torch"][1])
