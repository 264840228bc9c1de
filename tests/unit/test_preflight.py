"""`make preflight`, which a fresh install runs first: a wrong Python or no source for the locked
torch build stops it in seconds, naming what to set."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _preflight(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "preflight", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_this_interpreter_passes() -> None:
    done = _preflight(f"PYTHON={sys.executable}")
    assert done.returncode == 0, done.stderr


def test_another_python_is_refused_naming_the_fix() -> None:
    done = _preflight("PYTHON=/bin/false")
    assert done.returncode != 0
    assert "needs Python 3.11" in done.stderr and "PYTHON=/path/to/python3.11" in done.stderr


def test_a_torch_build_no_source_has_names_the_cpu_index() -> None:
    done = _preflight(f"PYTHON={sys.executable}", "TORCH_PIN=torch==2.13.0+nosuchbuild")
    assert done.returncode != 0
    assert "pip finds no torch==2.13.0+nosuchbuild" in done.stderr
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in done.stderr
