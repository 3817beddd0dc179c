"""Deployment files: valid for their tools, secure, and in agreement with deploy/service_matrix.json.

No container engine or cluster is needed: manifests are checked against the Kubernetes OpenAPI
schemas (kubernetes-validate, strict), compose by docker-compose itself, and the properties an
operator relies on (probes, non-root, node id from the pod name, AOF) by reading the YAML.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from protege_relay.cli import SERVICES
from shared.config import EgressConfig, RelayConfig, SmtpConfig, env_variable_names, load_config
from shared.redis_acl import HEALTH, SERVICE_USERS, write_secrets
from tests.support.processes import REPO_ROOT

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
MATRIX = json.loads((REPO_ROOT / "deploy" / "service_matrix.json").read_text())
SERVICE_MATRIX: dict[str, dict[str, Any]] = MATRIX["services"]
NODE_ID_ENV = MATRIX["nodeIdEnv"]
REDIS_CREDENTIALS: dict[str, str] = MATRIX["redisCredentials"]
MANIFESTS = sorted(path for path in K8S_DIR.glob("*.yaml") if path.name != "kustomization.yaml")
OLDEST_SUPPORTED_KUBERNETES = "1.29.0"
SECRET_FILE_MODE = 0o400
WEBSOCKET_TIMEOUT_S = 3600


def kubernetes_versions() -> list[str]:
    known = kubernetes_validate.all_versions()
    return sorted({OLDEST_SUPPORTED_KUBERNETES, kubernetes_validate.latest_version()} & set(known))


def k8s_resources() -> Iterator[dict[str, Any]]:
    for path in MANIFESTS:
        yield from (document for document in yaml.safe_load_all(path.read_text()) if document)


def resources_of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {item["metadata"]["name"]: item for item in k8s_resources() if item["kind"] == kind}


def compose() -> dict[str, Any]:
    """The compose file with anchors and `<<` merges resolved, as docker-compose reads it."""
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return document


def redis_server_args(service: dict[str, Any]) -> list[str]:
    """The `redis-server` arguments of a Redis data node, from its start script (x-redis-node)."""
    (script,) = service["command"]
    start = script.index("set -- redis-server ") + len("set -- ")
    return shlex.split(script[start : script.index(";", start)])


def parse_bytes(size: str) -> int:
    """`1536mb` (redis), `2Gi` (Kubernetes), `2g` (compose) -> bytes, all powers of 1024."""
    match = re.fullmatch(r"(\d+)\s*([kmg]?)i?b?", size.strip().lower())
    assert match, size
    unit: int = 1024 ** " kmg".index(match.group(2) or " ")
    return int(match.group(1)) * unit


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


# --- the matrix itself agrees with the code ---------------------------------------------------


def test_service_matrix_names_every_cli_service_with_the_default_ports() -> None:
    assert sorted(SERVICE_MATRIX) == sorted(SERVICES)
    for name, service in SERVICE_MATRIX.items():
        assert service["args"] == [name]
        assert NODE_ID_ENV in service["requiredEnv"] and "RELAY_REDIS_URL" in service["requiredEnv"]
        assert set(service["bindEnv"]) <= set(service["requiredEnv"])
    assert SERVICE_MATRIX["ingress"]["containerPort"] == SmtpConfig().port
    assert SERVICE_MATRIX["ingress"]["healthPort"] == SmtpConfig().httpPort
    assert SERVICE_MATRIX["tunnel"]["containerPort"] == SERVICE_MATRIX["tunnel"]["healthPort"] == RelayConfig().port
    assert SERVICE_MATRIX["egress"]["healthPort"] == EgressConfig().httpPort


# --- Kubernetes --------------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda path: path.name)
def test_manifest_is_valid_kubernetes_in_strict_mode(manifest: Path) -> None:
    resources = kubernetes_validate.resources_from_file(str(manifest))
    assert resources, f"{manifest.name} holds no resource"
    for version in kubernetes_versions():
        for resource in resources:
            kubernetes_validate.validate(resource, version, strict=True)  # raises on any error


def test_kustomization_applies_every_manifest_into_one_namespace() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [path.name for path in MANIFESTS]
    namespace = kustomization["namespace"]
    assert list(resources_of_kind("Namespace")) == [namespace]
    assert {item["metadata"].get("namespace") for item in k8s_resources() if item["kind"] != "Namespace"} == {namespace}


def test_every_tier_has_a_deployment_following_the_matrix() -> None:
    deployments = resources_of_kind("Deployment")
    assert sorted(deployments) == sorted(SERVICE_MATRIX)
    for name, deployment in deployments.items():
        expected = SERVICE_MATRIX[name]
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container.get("command") is None, "the image's entrypoint is protege-relay"
        assert container["args"] == expected["args"]
        env = env_of(container)
        assert set(expected["requiredEnv"]) <= set(env), name
        for variable, value in expected["bindEnv"].items():
            assert env[variable]["value"] == value, (name, variable)
        assert env[NODE_ID_ENV]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert pod["terminationGracePeriodSeconds"] == expected["terminationGracePeriodSeconds"]
        ports = {port["containerPort"] for port in container.get("ports", [])}
        assert expected["healthPort"] in ports
        if expected["containerPort"] is not None:
            assert expected["containerPort"] in ports


def test_deployments_probe_liveness_and_readiness_on_the_health_port() -> None:
    for name, deployment in resources_of_kind("Deployment").items():
        expected = SERVICE_MATRIX[name]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        for probe, path in (("livenessProbe", expected["livenessPath"]), ("readinessProbe", expected["readinessPath"])):
            assert container[probe]["httpGet"] == {"path": path, "port": expected["healthPort"]}, (name, probe)


def test_deployments_have_resource_requests_and_limits() -> None:
    for name, deployment in resources_of_kind("Deployment").items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), (name, bound)


def test_deployments_run_non_root_read_only_without_capabilities() -> None:
    for name, deployment in resources_of_kind("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in security["capabilities"], name
            assert "/tmp" in {mount["mountPath"] for mount in container["volumeMounts"]}, name


def test_config_and_secrets_are_mounted_read_only() -> None:
    (config_map,) = resources_of_kind("ConfigMap").values()
    for name, deployment in resources_of_kind("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
        config_mount = next(mount for volume_name, mount in mounts.items() if "configMap" in volumes[volume_name])
        assert volumes[config_mount["name"]]["configMap"]["name"] == config_map["metadata"]["name"]
        assert env_of(container)["RELAY_CONFIG"]["value"] == config_mount["mountPath"]
        for volume_name, volume in volumes.items():
            if "secret" in volume:
                assert volume["secret"]["defaultMode"] == SECRET_FILE_MODE, (name, volume_name)
                assert mounts[volume_name]["readOnly"] is True, (name, volume_name)
    secret_names = {
        volume["secret"]["secretName"]
        for deployment in resources_of_kind("Deployment").values()
        for volume in deployment["spec"]["template"]["spec"]["volumes"]
        if "secret" in volume
    }
    assert {"relay-dkim", "relay-attestation", "relay-smtp-tls"} <= secret_names


def test_config_map_holds_a_config_the_relay_accepts(tmp_path: Path) -> None:
    (config_map,) = resources_of_kind("ConfigMap").values()
    config_file = tmp_path / "config.json"
    config_file.write_text(config_map["data"]["config.json"])
    config = load_config(config_file, environ={})
    assert config.smtp.port == SERVICE_MATRIX["ingress"]["containerPort"]
    assert config.smtp.httpPort == SERVICE_MATRIX["ingress"]["healthPort"]
    assert config.egress.httpPort == SERVICE_MATRIX["egress"]["healthPort"]
    assert config.port == SERVICE_MATRIX["tunnel"]["containerPort"]
    assert config.dkim.privateKeyPath.startswith("/etc/relay/dkim/")


def test_smtp_load_balancer_keeps_client_ips_and_maps_25_to_the_ingress_port() -> None:
    service = resources_of_kind("Service")["ingress"]["spec"]
    assert service["type"] == "LoadBalancer"
    assert service["externalTrafficPolicy"] == "Local"
    (port,) = service["ports"]
    assert port["port"] == 25
    (container,) = resources_of_kind("Deployment")["ingress"]["spec"]["template"]["spec"]["containers"]
    named_ports = {item["name"]: item["containerPort"] for item in container["ports"]}
    assert named_ports.get(port["targetPort"], port["targetPort"]) == SERVICE_MATRIX["ingress"]["containerPort"]


def test_websocket_ingress_routes_ws_to_the_tunnel_with_hour_long_timeouts() -> None:
    assert resources_of_kind("Service")["tunnel"]["spec"]["type"] == "ClusterIP"
    (ingress,) = resources_of_kind("Ingress").values()
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == str(WEBSOCKET_TIMEOUT_S)
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == str(WEBSOCKET_TIMEOUT_S)
    assert ingress["spec"]["tls"], "wss:// terminates at the Ingress"
    paths = [path for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]]
    assert [(path["path"], path["backend"]["service"]["name"]) for path in paths] == [("/ws", "tunnel")]


def test_every_tier_autoscales_and_has_a_disruption_budget() -> None:
    autoscalers = resources_of_kind("HorizontalPodAutoscaler")
    assert {item["spec"]["scaleTargetRef"]["name"] for item in autoscalers.values()} == set(SERVICE_MATRIX)
    for autoscaler in autoscalers.values():
        assert autoscaler["apiVersion"] == "autoscaling/v2"
        assert 1 <= autoscaler["spec"]["minReplicas"] < autoscaler["spec"]["maxReplicas"]
    budgets = resources_of_kind("PodDisruptionBudget")
    deployments = resources_of_kind("Deployment")
    covered = {
        name
        for name, deployment in deployments.items()
        for budget in budgets.values()
        if budget["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    }
    assert covered == set(SERVICE_MATRIX)


def test_namespace_enforces_the_restricted_pod_security_standard() -> None:
    (namespace,) = resources_of_kind("Namespace").values()
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    workloads = [*resources_of_kind("Deployment").values(), *resources_of_kind("StatefulSet").values()]
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_redis_statefulset_persists_an_append_only_file() -> None:
    (statefulset,) = resources_of_kind("StatefulSet").values()
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] in ("everysec", "always")
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    limit = container["resources"]["limits"]["memory"]
    assert parse_bytes(args[args.index("--maxmemory") + 1]) <= 0.8 * parse_bytes(limit), "headroom for the fork"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert mount["mountPath"] == "/data"
    assert statefulset["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


# --- Kubernetes: the Sentinel overlay (deploy/k8s/ha, docs/HA.md) ------------------------------

HA_DIR = K8S_DIR / "ha"


def ha_resources() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((HA_DIR / "redis-sentinel.yaml").read_text()) if doc]


def test_ha_manifests_are_valid_kubernetes_in_strict_mode() -> None:
    resources = kubernetes_validate.resources_from_file(str(HA_DIR / "redis-sentinel.yaml"))
    for version in kubernetes_versions():
        for resource in resources:
            kubernetes_validate.validate(resource, version, strict=True)


def test_ha_overlay_replaces_the_single_redis_and_patches_only_base_resources() -> None:
    kustomization = yaml.safe_load((HA_DIR / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../", "redis-sentinel.yaml"]
    assert kustomization["namespace"] == yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())["namespace"]
    base = {(item["kind"], item["metadata"]["name"]) for item in k8s_resources()}
    patched: list[dict[str, Any]] = []
    for entry in kustomization["patches"]:
        patched += [doc for doc in yaml.safe_load_all((HA_DIR / entry["path"]).read_text()) if doc]
    assert all((doc["kind"], doc["metadata"]["name"]) in base for doc in patched)
    deleted = {(doc["kind"], doc["metadata"]["name"]) for doc in patched if doc.get("$patch") == "delete"}
    assert deleted == {("StatefulSet", "redis"), ("Service", "redis")}
    added = {(item["kind"], item["metadata"]["name"]) for item in ha_resources()}
    assert {("StatefulSet", "redis"), ("Service", "redis"), ("StatefulSet", "redis-sentinel")} <= added
    assert not (added - deleted) & base, "the overlay adds nothing the base already has"
    # Every tier is told where the sentinels are and to wait for a replica, with variables the config knows.
    known = {name for name, _ in env_variable_names()}
    tiers = {doc["metadata"]["name"]: doc for doc in patched if doc["kind"] == "Deployment"}
    assert sorted(tiers) == sorted(SERVICE_MATRIX)
    for deployment in tiers.values():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {item["name"]: item["value"] for item in container["env"]}
        assert set(env) <= known
        assert env["RELAY_REDIS_MIN_REPLICAS_TO_ACK"] == "1"
        config = load_config(environ=env)
        assert len(config.redis.sentinels) == 3 and config.redis.sentinelMaster == "relay"


def test_ha_redis_and_sentinels_are_spread_over_nodes_with_disruption_budgets() -> None:
    statefulsets = {item["metadata"]["name"]: item for item in ha_resources() if item["kind"] == "StatefulSet"}
    budgets = {
        item["metadata"]["name"]: item["spec"] for item in ha_resources() if item["kind"] == "PodDisruptionBudget"
    }
    for name, replicas in (("redis", 3), ("redis-sentinel", 3)):
        spec = statefulsets[name]["spec"]
        assert spec["replicas"] == replicas
        (term,) = spec["template"]["spec"]["affinity"]["podAntiAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
        assert budgets[name]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
        assert spec["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert budgets["redis"]["maxUnavailable"] == 1  # a primary and a replica stay: minReplicasToAck=1 holds
    assert budgets["redis-sentinel"]["minAvailable"] == 2  # the majority that authorises a failover
    scripts = next(item for item in ha_resources() if item["kind"] == "ConfigMap")["data"]
    assert (
        "--appendonly yes" in scripts["redis-start.sh"] and "--maxmemory-policy noeviction" in scripts["redis-start.sh"]
    )
    assert "sentinel monitor relay ${primary} 6379 2" in scripts["sentinel-start.sh"]
    # The ACL of the base applies; replication and sentinel links authenticate, from a mounted Secret.
    assert "--aclfile /etc/redis/acl/users.acl" in scripts["redis-start.sh"]
    assert "masterauth" in scripts["redis-start.sh"] and "auth-pass" in scripts["sentinel-start.sh"]
    assert "/etc/redis/admin/password" in scripts["redis-start.sh"]


# --- docker-compose ----------------------------------------------------------------------------


def test_docker_compose_accepts_the_compose_file(tmp_path: Path) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (make test installs it: scripts/test-tools.sh)")
    write_secrets(tmp_path)  # what an operator runs first; compose needs its env files
    completed = subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=REPO_ROOT,
        env={**os.environ, REDIS_CREDENTIALS["secretsDirEnv"]: str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr


def test_docker_compose_accepts_the_ha_profile(tmp_path: Path) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (.ci/run installs it)")
    write_secrets(tmp_path)
    completed = subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), "--profile", "ha", "config", "-q"],
        cwd=REPO_ROOT,
        env={**os.environ, REDIS_CREDENTIALS["secretsDirEnv"]: str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr


def test_compose_ha_profile_has_a_replica_and_three_sentinels() -> None:
    services = compose()["services"]
    ha = sorted(name for name, service in services.items() if service.get("profiles") == ["ha"])
    assert ha == ["redis-replica", "redis-sentinel-1", "redis-sentinel-2", "redis-sentinel-3"]
    # Both data nodes start alike: the replica of whatever primary the sentinels name (`redis` when
    # none answers), never a second primary after a failover; replication authenticates as admin.
    assert services["redis-replica"]["command"] == services["redis"]["command"]
    (node,) = services["redis"]["command"]
    assert "sentinel get-master-addr-by-name relay" in node and 'primary="$${primary:-redis}"' in node
    assert '--replicaof "$$primary" 6379' in node and "masterauth" in node
    assert '--replica-announce-ip "$$REDIS_NODE_NAME"' in node
    for name in ("redis", "redis-replica"):
        assert services[name]["environment"]["REDIS_NODE_NAME"] == name
        assert services[name]["env_file"] == secrets_path("admin.env"), name
    sentinel = services["redis-sentinel-1"]["command"][0]
    assert "sentinel get-master-addr-by-name relay" in sentinel, "a restarted sentinel follows the failover"
    assert "sentinel monitor relay $${primary:-redis} 6379 2" in sentinel and "--sentinel" in sentinel
    assert "sentinel announce-hostnames yes" in sentinel  # the names the nodes announce, not their IPs
    assert "sentinel auth-pass relay $$RELAY_REDIS_PASSWORD" in sentinel
    env = services["ingress"]["environment"]
    assert env["RELAY_REDIS_SENTINELS"] == "${RELAY_REDIS_SENTINELS:-}"  # empty: one Redis, as without the profile
    assert load_config(environ={"RELAY_REDIS_SENTINELS": ""}).redis.sentinels == []


def test_compose_redis_uses_aof_on_a_named_volume_with_a_health_check() -> None:
    document = compose()
    redis_service = document["services"]["redis"]
    assert redis_service["image"] == "redis:7-alpine"
    command = redis_server_args(redis_service)
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    maxmemory = parse_bytes(command[command.index("--maxmemory") + 1])
    assert maxmemory <= 0.8 * parse_bytes(redis_service["mem_limit"]), "headroom for the fork"
    health = ["CMD", "redis-cli", "--user", HEALTH, "--pass", HEALTH, "--no-auth-warning", "ping"]
    assert redis_service["healthcheck"]["test"] == health  # the ACL's PING-only user
    volume, mount_path = redis_service["volumes"][0].split(":")[:2]
    assert mount_path == "/data" and volume in document["volumes"]


def test_compose_runs_each_tier_as_the_matrix_says() -> None:
    services = compose()["services"]
    for name, expected in SERVICE_MATRIX.items():
        service = services[name]
        assert service["entrypoint"] == ["protege-relay"]
        assert service["command"] == expected["args"]
        env = service["environment"]
        assert env["RELAY_REDIS_URL"] == "redis://redis:6379/0"
        # The node id defaults to <container hostname>-<pid>, unique per replica (the matrix says so).
        assert set(expected["requiredEnv"]) - {NODE_ID_ENV} <= set(env), name
        for variable, value in expected["bindEnv"].items():
            assert env[variable] == value, (name, variable)
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        health_url = f"http://127.0.0.1:{expected['healthPort']}{expected['livenessPath']}"
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"] and health_url in test[3], name
        assert service["stop_grace_period"] == f"{expected['terminationGracePeriodSeconds']}s"
        if expected["scalableInCompose"]:
            assert "container_name" not in service and "ports" not in service, f"{name} must scale"
    assert services["ingress"]["ports"] == [f"25:{SERVICE_MATRIX['ingress']['containerPort']}"]
    assert services["ingress"]["environment"]["RELAY_SMTP_HOST"] == "0.0.0.0"


def test_compose_puts_the_tunnels_behind_a_websocket_proxy_on_8080() -> None:
    proxy = compose()["services"]["tunnel-proxy"]
    assert proxy["ports"] == ["8080:8080"]
    config_path, mounted_at = proxy["volumes"][0].split(":")[:2]
    assert mounted_at.startswith("/etc/nginx/")
    nginx_conf = (REPO_ROOT / config_path).read_text()
    assert re.search(rf"proxy_read_timeout\s+{WEBSOCKET_TIMEOUT_S}s;", nginx_conf)
    assert re.search(rf"proxy_send_timeout\s+{WEBSOCKET_TIMEOUT_S}s;", nginx_conf)
    assert "proxy_set_header Upgrade $http_upgrade;" in nginx_conf
    assert "proxy_http_version 1.1;" in nginx_conf
    tunnel_port = SERVICE_MATRIX["tunnel"]["containerPort"]
    assert f"http://tunnel:{tunnel_port}" in nginx_conf
    assert "resolver 127.0.0.11" in nginx_conf, "re-resolve `tunnel` so --scale replicas are used"


# --- the image ---------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[str]]:
    """Instructions per build stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO_ROOT / "Dockerfile").read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(stripped)
    return stages


def test_image_is_multi_stage_slim_non_root_with_the_cli_as_entrypoint() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        assert stage[0].split()[1].startswith("python:3.11-slim")
    final = stages[-1]
    assert any(line.startswith("COPY --from=") for line in final)
    installs = [line for line in stages[0] if "pip install" in line and " . " in f"{line} "]
    assert installs and all("-c constraints.txt" in line for line in installs), "the image installs the tested pins"
    assert not any(re.search(r"apt-get install|build-essential|gcc", line) for line in final)
    (user,) = [line.split()[1] for line in final if line.startswith("USER ")]
    assert user.split(":")[0] not in ("0", "root")
    assert [line for line in final if line.startswith("ENTRYPOINT")] == ['ENTRYPOINT ["protege-relay"]']


def test_dockerignore_sends_only_the_package_sources() -> None:
    rules = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()]
    rules = [rule for rule in rules if rule and not rule.startswith("#")]
    assert rules[0] == "*"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert allowed == {"pyproject.toml", "constraints.txt", "shared", "services", "protege_relay"}


# --- Redis access: one ACL user per service, credentials from outside the image ------------------


def secrets_path(file_name: str) -> str:
    return f"${{{REDIS_CREDENTIALS['secretsDirEnv']}:-{REDIS_CREDENTIALS['defaultSecretsDir']}}}/{file_name}"


def test_every_service_has_its_own_redis_user_in_the_acl_source() -> None:
    assert {service["redisUser"] for service in SERVICE_MATRIX.values()} | {"status"} == {
        user.name for user in SERVICE_USERS
    }


def test_compose_redis_requires_the_acl_file_and_each_tier_its_credentials() -> None:
    services = compose()["services"]
    command = redis_server_args(services["redis"])
    acl_path = command[command.index("--aclfile") + 1]
    assert f"{secrets_path('users.acl')}:{acl_path}:ro" in services["redis"]["volumes"]
    for name, expected in SERVICE_MATRIX.items():
        assert services[name]["env_file"] == secrets_path(f"{expected['redisUser']}.env"), name
        env = services[name]["environment"]
        assert not {"RELAY_REDIS_PASSWORD", "RELAY_REDIS_USERNAME"} & set(env), "credentials come from env_file"
    ignored = (REPO_ROOT / ".gitignore").read_text().splitlines()
    assert REDIS_CREDENTIALS["defaultSecretsDir"].removeprefix("./") + "/" in ignored


def test_k8s_redis_loads_the_acl_secret_and_each_tier_reads_its_password_file() -> None:
    (statefulset,) = resources_of_kind("StatefulSet").values()
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    acl_path = Path(container["args"][container["args"].index("--aclfile") + 1])
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    (acl_mount,) = [mount for mount in container["volumeMounts"] if Path(mount["mountPath"]) == acl_path.parent]
    assert volumes[acl_mount["name"]]["secret"]["secretName"] == REDIS_CREDENTIALS["k8sAclSecret"]
    assert volumes[acl_mount["name"]]["secret"]["defaultMode"] == SECRET_FILE_MODE and acl_mount["readOnly"]
    for name, deployment in resources_of_kind("Deployment").items():
        user = SERVICE_MATRIX[name]["redisUser"]
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = env_of(container)
        assert env["RELAY_REDIS_USERNAME"]["value"] == user
        assert "RELAY_REDIS_PASSWORD" not in env
        password_file = Path(env[REDIS_CREDENTIALS["passwordFileEnv"]]["value"])
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == password_file.parent]
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == REDIS_CREDENTIALS["k8sPasswordSecretPrefix"] + user, name


def network_policies() -> dict[str, dict[str, Any]]:
    return resources_of_kind("NetworkPolicy")


def test_network_policies_deny_by_default_and_open_only_each_pods_own_ports() -> None:
    policies = network_policies()
    default = [p for p in policies.values() if p["spec"]["podSelector"] == {}]
    assert len(default) == 1 and "ingress" not in default[0]["spec"], "default deny for every pod"
    for name, expected in SERVICE_MATRIX.items():
        (policy,) = [
            p
            for p in policies.values()
            if p["spec"]["podSelector"].get("matchLabels") == {"app.kubernetes.io/name": name}
        ]
        ports = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
        assert ports == {expected["containerPort"], expected["healthPort"]} - {None}, name
        public = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
        assert [port["port"] for rule in public for port in rule["ports"]] == (
            [expected["containerPort"]] if name == "ingress" else []
        ), "only SMTP is open to everyone"


def test_network_policy_lets_only_relay_pods_reach_redis() -> None:
    policy = network_policies()["redis"]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "redis"}
    assert policy["egress"] == [] and "Egress" in policy["policyTypes"]
    (rule,) = policy["ingress"]
    assert [port["port"] for port in rule["ports"]] == [6379]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}, "pods of this namespace only"
    (expression,) = source["podSelector"]["matchExpressions"]
    assert (expression["key"], expression["operator"]) == ("app.kubernetes.io/name", "In")
    assert sorted(expression["values"]) == sorted(SERVICE_MATRIX)


# --- smaller items: what is public, whom the tunnel trusts, the hardened infrastructure ----------


def test_compose_nginx_proxies_only_the_websocket_endpoint() -> None:
    proxy = compose()["services"]["tunnel-proxy"]
    config_path = proxy["volumes"][0].split(":")[0]
    nginx_conf = (REPO_ROOT / config_path).read_text()
    locations = dict(re.findall(r"location\s+([^{]+?)\s*\{(.*?)\n    \}", nginx_conf, re.S))
    proxied = sorted(path for path, body in locations.items() if "proxy_pass" in body)
    assert proxied == ["= /ws"], "never /metrics, /readyz or /healthz of the tunnel"
    assert "return 404" in locations["/"]


def test_the_tunnel_trusts_only_its_proxy() -> None:
    services = compose()["services"]
    proxy_ip = services["tunnel-proxy"]["networks"]["relay"]["ipv4_address"]
    trusted = json.loads(services["tunnel"]["environment"]["RELAY_WS_TRUSTED_PROXIES"])
    assert trusted == [f"{proxy_ip}/32"]
    # Docker hands out addresses from ip_range only; were nginx's inside it, a replica started
    # first (`--scale egress=4`) could take it and nginx would not start ("Address already in use").
    (pool,) = compose()["networks"]["relay"]["ipam"]["config"]
    address = ipaddress.ip_address(proxy_ip)
    assert address in ipaddress.ip_network(pool["subnet"]) and address not in ipaddress.ip_network(pool["ip_range"])
    (config_map,) = resources_of_kind("ConfigMap").values()
    k8s_trusted = json.loads(config_map["data"]["config.json"])["ws"]["trustedProxies"]
    assert all(int(entry.partition("/")[2] or 32) >= 16 for entry in k8s_trusted), "never a whole /8"


def test_compose_redis_and_nginx_run_without_capabilities_read_only_and_bounded() -> None:
    services = compose()["services"]
    for name in ("redis", "redis-replica", "redis-sentinel-1", "redis-sentinel-2", "redis-sentinel-3", "tunnel-proxy"):
        service = services[name]
        assert service["cap_drop"] == ["ALL"] and "cap_add" not in service, name
        assert service["read_only"] is True, name
        assert service["security_opt"] == ["no-new-privileges:true"], name
        assert parse_bytes(service["mem_limit"]) > 0, name
        assert service["user"].split(":")[0] not in ("0", "root"), name


def test_compose_scratch_tmpfs_belong_to_the_user_that_writes_them() -> None:
    # A tmpfs takes the owner of the image directory it covers (root, 0755 for nginx's
    # /var/cache/nginx and /run, redis's /data): a non-root service could not write there, and
    # nginx died at start with "mkdir() /var/cache/nginx/client_temp failed (13: Permission denied)".
    for name, service in compose()["services"].items():
        uid, _, gid = service.get("user", "").partition(":")
        for entry in service.get("tmpfs", []):
            path, _, options = entry.partition(":")
            if path == "/tmp" or not uid:
                continue  # /tmp is world-writable (sticky) in every image
            assert f"uid={uid}" in options.split(",") and f"gid={gid}" in options.split(","), (name, entry)
