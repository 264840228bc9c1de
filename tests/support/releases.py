"""The releases this code upgrades from, as CHANGELOG.md records them ("## 0.2.0 (date, commit
abc1234)"), and a release's code taken out of git."""

from __future__ import annotations

import re
import subprocess
import tarfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from tests.support.serving import ROOT

HEADING = re.compile(r"^## (\d+\.\d+\.\d+) \(([^,]+), commit ([0-9a-f]{7,40})\)$", re.MULTILINE)


@dataclass(frozen=True)
class Release:
    version: str
    date: str
    commit: str


def releases(changelog: Path = ROOT / "CHANGELOG.md") -> list[Release]:
    """Every release with a commit, newest first."""
    return [Release(*m.groups()) for m in HEADING.finditer(changelog.read_text())]


def previous() -> Release:
    """The newest release: what a deployment of this code upgrades from."""
    found = releases()
    if not found:
        raise LookupError("CHANGELOG.md names no release commit")
    return found[0]


def checkout(release: Release, dest: Path, *paths: str) -> Path:
    """`paths` of the release's tree (git archive) under `dest`; `dest`."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", release.commit, *paths], cwd=ROOT, capture_output=True, check=True
    ).stdout
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest
