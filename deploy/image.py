"""`make image`: the Bento and its container image, tagged with the Bento version.

    python deploy/image.py [--name sentiment] [--base-image NAME:TAG]
    python deploy/image.py --bento-only          # make bento: the Bento alone

The Bento's Python packages are pyproject.toml's dependencies, put into bentofile.yaml's config
here at build time, so the project declares them once.

1. The CPU build of torch 2.13.0 as a wheel file (`pip download`, from TORCH_INDEX_URL when
   set): the index's own torch==2.13.0 is the multi-GB CUDA build, so the Bento carries the
   CPU wheel and its requirement resolves to it.
2. `bentoml build` from bentofile.yaml plus that wheel (and BASE_IMAGE as the Docker base when
   given: deploy/base-image.sh builds one from Debian packages where no registry is reachable).
3. `bentoml containerize` with the legacy builder on the host network, tagged
   `<name>:<bento version>`; the models are inside, the server runs as the non-root `bentoml`.

Prints the image reference, its size and the time each step took.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


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
    return wheel


def bento_config(wheel: Path | None = None, base_image: str | None = None) -> dict[str, Any]:
    """bentofile.yaml with pyproject.toml's dependencies as its packages; with `wheel`, torch
    comes from that wheel alone: left in the requirements, the index's CUDA build would be
    installed first (4 GB of CUDA libraries that the CPU wheel installed over it leaves behind)."""
    config = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    python = config.setdefault("python", {})
    python["packages"] = [p for p in packages if not (wheel and p.startswith("torch"))]
    if wheel is not None:
        python["wheels"] = [str(wheel.relative_to(ROOT))]
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
