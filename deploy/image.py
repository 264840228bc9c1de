"""`make image`: the Bento and its container image, tagged with the Bento version.

    python deploy/image.py [--name sentiment] [--base-image NAME:TAG]
    python deploy/image.py --bento-only          # make bento: the Bento alone

The Bento's Python packages are the runtime lock's (bentofile.yaml: requirements/runtime.txt,
written by `make lock` from pyproject.toml): every package at its locked version, each file
checked against the lock's hashes when the image installs it.

1. The CPU build of torch 2.13.0 as a wheel file (`pip download`, from TORCH_INDEX_URL when
   set), checked against the lock's hash: the lock pins torch==2.13.0+cpu, which PyPI does not
   have (its torch==2.13.0 is the multi-GB CUDA build), so the Bento carries the wheel and the
   image's install finds it through find_links.
2. `bentoml build` from bentofile.yaml plus that wheel (and BASE_IMAGE as the Docker base when
   given: deploy/base-image.sh builds one from Debian packages where no registry is reachable).
3. `bentoml containerize` with the legacy builder on the host network, tagged
   `<name>:<bento version>`; the models are inside, the server runs as the non-root `bentoml`.

Prints the image reference, its size and the time each step took.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
LOCK = "requirements/runtime.txt"
# Where the Bento's env/python/wheels lies in BentoML's image (its BENTO_PATH, fixed in 1.4):
# install.sh runs the lock's install from env/python and the wheels' from the Bento's root, so
# only an absolute find-links path serves both, and uv refuses one that does not exist.
IMAGE_WHEELS = "/home/bentoml/bento/env/python/wheels"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, **kw)


def torch_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob("torch-2.13.0*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "torch==2.13.0", "-d", str(dest)]
        if os.environ.get("TORCH_INDEX_URL"):
            cmd += ["--index-url", os.environ["TORCH_INDEX_URL"]]
        run(cmd)
        found = sorted(dest.glob("torch-2.13.0*.whl"))
    wheel = found[-1]
    if "+cpu" not in wheel.name:
        raise SystemExit(f"{wheel.name} is not the CPU build: set TORCH_INDEX_URL to an index that has it")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest not in locked_hashes("torch"):
        raise SystemExit(f"{wheel.name} (sha256 {digest}) is not the torch wheel {LOCK} records")
    return wheel


def locked_hashes(name: str) -> set[str]:
    """The sha256 digests the runtime lock records for one package."""
    entry = re.search(rf"^{re.escape(name)}==\S+((?:\s*\\\n\s*--hash=sha256:\w+)+)", (ROOT / LOCK).read_text(), re.M)
    return set(re.findall(r"sha256:(\w+)", entry.group(1))) if entry else set()


def bento_config(wheel: Path | None = None, base_image: str | None = None) -> dict[str, Any]:
    """bentofile.yaml, whose requirements are the runtime lock; with `wheel` (the image), the
    Bento carries that torch wheel, where the image's install finds the lock's torch==2.13.0+cpu."""
    config = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    python = config.setdefault("python", {})
    if wheel is not None:
        python["wheels"] = [str(wheel.relative_to(ROOT))]
        python["find_links"] = [IMAGE_WHEELS]
        docker = config.setdefault("docker", {})
        docker["python_version"] = "3.11"
        if base_image:
            docker["base_image"] = base_image
    return config


def build_bento(config: dict[str, Any]) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=ROOT, prefix=".bentofile-image-", delete=False) as f:
        yaml.safe_dump(config, f, sort_keys=False)
    try:
        out = run([str(VENV_BIN / "bentoml"), "build", "-f", f.name, "--output", "tag"], cwd=ROOT, capture_output=True)
    finally:
        os.unlink(f.name)
    tag = [line for line in out.stdout.splitlines() if line.strip()][-1].strip()
    return tag.removeprefix("__tag__:")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=os.environ.get("IMAGE", "sentiment"), help="image name (registry path)")
    parser.add_argument("--base-image", default=os.environ.get("BASE_IMAGE") or None)
    parser.add_argument("--bento-only", action="store_true", help="build the Bento (make bento), no image")
    args = parser.parse_args()

    if args.bento_only:
        print(f"built {build_bento(bento_config())}")
        return 0
    started = time.monotonic()
    wheel = torch_wheel(ROOT / "var" / "wheels")
    t_wheel = time.monotonic()
    bento = build_bento(bento_config(wheel, args.base_image))
    t_bento = time.monotonic()
    version = bento.split(":", 1)[1]
    image = f"{args.name}:{version}"
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    run(
        [str(VENV_BIN / "bentoml"), "containerize", bento, "-t", image, "--opt", "network=host"],
        cwd=ROOT,
        env=env,
    )
    t_image = time.monotonic()
    size = run(["docker", "image", "inspect", "-f", "{{.Size}}", image], capture_output=True).stdout.strip()
    print(
        f"built {image} from {bento}: {int(size) / 1e9:.2f} GB; wheel {t_wheel - started:.0f} s, "
        f"bento {t_bento - t_wheel:.0f} s, image {t_image - t_bento:.0f} s, total {t_image - started:.0f} s"
    )
    (ROOT / "var").mkdir(exist_ok=True)
    (ROOT / "var" / "image").write_text(image + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
