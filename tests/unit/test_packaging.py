"""The Bento installs exactly what the project declares, from the one list in pyproject.toml."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _image_module():
    spec = importlib.util.spec_from_file_location("image", ROOT / "deploy" / "image.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bento_takes_its_packages_from_pyproject() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "packages" not in yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]
    image = _image_module()
    assert image.bento_config()["python"]["packages"] == declared
    wheel = ROOT / "var" / "wheels" / "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl"
    with_wheel = image.bento_config(wheel, "base:1")["python"]
    assert with_wheel["packages"] == [p for p in declared if not p.startswith("torch")]
    assert with_wheel["wheels"] == ["var/wheels/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl"]
