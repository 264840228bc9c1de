"""The compose stack's replicas from one number: the compose override that adds them, nginx's
upstream and Prometheus's targets, all written from N so that they cannot disagree.

    python3 deploy/replicas.py N [--out var/stack]        (make up REPLICAS=N calls it)

compose.yaml itself runs api-1 and api-2 (with the upstream and targets files committed beside
it, which this script writes the same for N=2). For N replicas it writes to --out:

- `compose.replicas.yaml`: api-3 ... api-N as copies of compose.yaml's api-1, each with a spill
  volume of its own; nginx waits for all of them and reads the upstream below; Prometheus reads
  the targets below. (Copies, not compose's `extends`: compose 1.29 refuses to extend a service
  that has `depends_on`.)
- `compose.replicas.airgap.yaml`: the same for compose.airgap.yaml, whose replicas share the
  host's network: replica i listens on 127.0.0.1:310i (3101, 3102, ... as the file's own two).
- `nginx/` and `nginx-airgap/`: each stack's server.conf, and an upstream.conf naming every replica.
- `targets.yml` and `targets-airgap.yml`: every replica, for Prometheus (nginx refuses /metrics).

    docker-compose -f compose.yaml -f var/stack/compose.replicas.yaml up -d
    docker-compose -f compose.yaml -f compose.airgap.yaml -f var/stack/compose.replicas.yaml \\
        -f var/stack/compose.replicas.airgap.yaml up -d

It needs PyYAML only (docker-compose 1.29 itself runs on it; else `pip install pyyaml`), not the
project's environment: the host that runs compose may have none. Every replica
shares Redis, PostgreSQL, ADMIN_API_KEY and REQUEST_ID_KEY (the secrets are the stack's), as
replicas must (README, "Deploy and scale").
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

try:
    import yaml
except ImportError:  # pragma: no cover - a host without it
    raise SystemExit("deploy/replicas.py needs PyYAML: apt-get install python3-yaml, or pip install pyyaml") from None

ROOT = Path(__file__).resolve().parent.parent
MIN_REPLICAS = 2  # compose.yaml's own api-1 and api-2
MAX_REPLICAS = 9  # ports 3101-3109 on the air-gapped stack's host network
UPSTREAM = "server {address} max_fails=3 fail_timeout=10s;\n"


def names(n: int) -> list[str]:
    return [f"api-{i}" for i in range(1, n + 1)]


def bridge_address(i: int) -> str:
    return f"api-{i}:3000"


def airgap_address(i: int) -> str:
    return f"127.0.0.1:{3100 + i}"


def _listed(n: int, airgap: bool) -> tuple[str, list[str]]:
    """The comment line heading a generated file, and the `n` replicas' addresses."""
    address = airgap_address if airgap else bridge_address
    head = (
        f"# The air-gapped stack: the {n} replicas on the host's loopback.\n"
        if airgap
        else f"# compose.yaml: the {n} replicas on the stack's network.\n"
    )
    return head, [address(i) for i in range(1, n + 1)]


def upstream(n: int, airgap: bool) -> str:
    """nginx's upstream servers for `n` replicas."""
    head, addresses = _listed(n, airgap)
    return head + "".join(UPSTREAM.format(address=a) for a in addresses)


def targets(n: int, airgap: bool) -> str:
    """Prometheus's file_sd targets for `n` replicas (YAML, written as JSON, which YAML reads)."""
    head, addresses = _listed(n, airgap)
    return head + "- targets: " + json.dumps(addresses) + "\n"


def _service(file: str, name: str) -> dict:
    """A service of a compose file as compose reads it (anchors and merge keys resolved)."""
    return copy.deepcopy(yaml.safe_load((ROOT / file).read_text())["services"][name])


def airgap_replica(port: int) -> dict:
    """The air-gapped stack's api-1 (compose.airgap.yaml's part of it) listening on `port`."""
    replica = _service("compose.airgap.yaml", "api-1")
    replica["command"] = [str(port) if arg == "3101" else arg for arg in replica["command"]]
    replica["healthcheck"]["test"] = [arg.replace(":3101/", f":{port}/") for arg in replica["healthcheck"]["test"]]
    return replica


def overrides(n: int, out: Path) -> tuple[dict, dict]:
    """The compose overrides for `n` replicas: the base stack's and the air-gapped one's."""
    extra = range(MIN_REPLICAS + 1, n + 1)
    everyone = {name: {"condition": "service_healthy"} for name in names(n)}
    replicas = {}
    for i in extra:
        replica = _service("compose.yaml", "api-1")
        replica["volumes"] = [f"spill-{i}:/home/bentoml/spill", "/tmp"]
        replicas[f"api-{i}"] = replica
    base: dict = {
        "services": {
            **replicas,
            "nginx": {"depends_on": everyone, "volumes": [f"{out / 'nginx'}:/etc/nginx/sentiment:ro"]},
            "prometheus": {"volumes": [f"{out / 'targets.yml'}:/etc/prometheus/targets.yml:ro"]},
        },
        "volumes": {f"spill-{i}": {} for i in extra},
    }
    airgap_replicas = {f"api-{i}": airgap_replica(3100 + i) for i in extra}
    airgap: dict = {
        "services": {
            **airgap_replicas,
            "nginx-host": {"depends_on": everyone, "volumes": [f"{out / 'nginx-airgap'}:/etc/nginx/sentiment:ro"]},
            "prometheus-host": {"volumes": [f"{out / 'targets-airgap.yml'}:/etc/prometheus/targets.yml:ro"]},
        }
    }
    return base, airgap


def write(n: int, out: Path) -> list[Path]:
    """Every file for `n` replicas in `out`; the paths written."""
    if not MIN_REPLICAS <= n <= MAX_REPLICAS:
        raise SystemExit(f"REPLICAS={n}: from {MIN_REPLICAS} to {MAX_REPLICAS} (compose.yaml runs two)")
    out = out.resolve()
    written = []
    for folder, source, airgap in (
        ("nginx", ROOT / "deploy" / "nginx" / "compose", False),
        ("nginx-airgap", ROOT / "deploy" / "airgap" / "nginx", True),
    ):
        (out / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(source / "server.conf", out / folder / "server.conf")
        (out / folder / "upstream.conf").write_text(upstream(n, airgap))
        written += [out / folder / "server.conf", out / folder / "upstream.conf"]
    (out / "targets.yml").write_text(targets(n, False))
    (out / "targets-airgap.yml").write_text(targets(n, True))
    base, airgap = overrides(n, out)
    note = f"# Written by deploy/replicas.py for {n} replicas: do not edit, run it again.\n"
    (out / "compose.replicas.yaml").write_text(note + json.dumps(base, indent=2) + "\n")
    (out / "compose.replicas.airgap.yaml").write_text(note + json.dumps(airgap, indent=2) + "\n")
    return [*written, *(out / name for name in ("targets.yml", "targets-airgap.yml"))] + [
        out / "compose.replicas.yaml",
        out / "compose.replicas.airgap.yaml",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("replicas", type=int)
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "stack")
    args = parser.parse_args()
    for path in write(args.replicas, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
