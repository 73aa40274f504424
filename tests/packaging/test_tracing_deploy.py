"""The tracing pieces of the deployment files agree (docs/operations.md, "Tracing"): the compose `monitoring`
profile's OpenTelemetry collector (its image cannot be fetched here, so its configuration's structure is checked:
every component a pipeline names is defined, and it listens where the replicas send), the replicas' OTEL_*
variables in compose and Kubernetes, and Envoy keeping the trace context."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from devkit import ROOT
from server.app.tracing import exporters_wanted

COLLECTOR = "deploy/otel-collector.yaml"
KINDS = ("receivers", "processors", "exporters")


def load_yaml(path: str) -> Any:
    return yaml.safe_load((ROOT / path).read_text())


@pytest.fixture(scope="module")
def collector() -> dict[str, Any]:
    return load_yaml(COLLECTOR)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml("docker-compose.yml")


def test_every_component_a_pipeline_names_is_defined(collector: dict[str, Any]) -> None:
    pipelines = collector["service"]["pipelines"]
    assert "traces" in pipelines
    for name, pipeline in pipelines.items():
        assert name.split("/")[0] in {"traces", "metrics", "logs"}, name
        assert pipeline["receivers"] and pipeline["exporters"], name
        for kind in KINDS:
            for component in pipeline.get(kind, []):
                assert component in (collector.get(kind) or {}), f"pipeline {name} names {kind} {component}, undefined"
    used = {component for pipeline in pipelines.values() for kind in KINDS for component in pipeline.get(kind, [])}
    defined = {component for kind in KINDS for component in collector.get(kind) or {}}
    assert defined <= used, f"defined but in no pipeline: {sorted(defined - used)}"
    # The memory limiter goes first, so it refuses spans before others hold them.
    assert pipelines["traces"]["processors"][0] == "memory_limiter"


def test_the_collector_listens_where_the_replicas_send(collector: dict[str, Any], compose: dict[str, Any]) -> None:
    services = compose["services"]
    otel = services["otel-collector"]
    assert otel["profiles"] == ["monitoring"]
    assert otel["image"].startswith(("otel/opentelemetry-collector:", "otel/opentelemetry-collector-contrib:"))
    target = next(arg.split("=", 1)[1] for arg in otel["command"] if arg.startswith("--config="))
    assert f"./{COLLECTOR}:{target}:ro" in otel["volumes"]
    assert "ports" not in otel  # spans come over the compose network; nothing published

    grpc_endpoint = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    listen_port = int(grpc_endpoint.rsplit(":", 1)[1])
    environment = services["server"]["environment"]
    sent_to = urlparse(environment["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert (sent_to.scheme, sent_to.hostname, sent_to.port) == ("http", "otel-collector", listen_port)
    assert str(listen_port) in otel["expose"]
    # Off unless the operator sets OTEL_TRACES_EXPORTER where compose runs (compose's ${NAME:-default}).
    assert environment["OTEL_TRACES_EXPORTER"] == "${OTEL_TRACES_EXPORTER:-none}"
    assert exporters_wanted({"OTEL_TRACES_EXPORTER": "none"}) == []


def test_kubernetes_documents_the_same_variables() -> None:
    """The manifest leaves tracing off and shows, commented, the variables compose sets."""
    text = (ROOT / "deploy/k8s/lstm-serve.yaml").read_text()
    lines = [line.strip() for line in text.splitlines()]
    commented = [line.removeprefix("# ") for line in lines if line.startswith("# - {name: OTEL_")]
    names = {yaml.safe_load(line)[0]["name"] for line in commented}
    assert {"OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME"} <= names
    for document in yaml.safe_load_all(text):
        for container in ((document or {}).get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])):
            assert not [item for item in container.get("env", []) if item["name"].startswith("OTEL_")]


def _values(node: Any, key: str) -> list[Any]:
    """Every value of `key` anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [x for v in node.values() for x in _values(v, key)]
    if isinstance(node, list):
        return [x for item in node for x in _values(item, key)]
    return []


@pytest.mark.parametrize("path", ["deploy/envoy.yaml", "deploy/k8s/envoy.yaml"])
def test_envoy_keeps_the_trace_context(path: str) -> None:
    """No header removal touches traceparent or tracestate (tests/serving/test_tracing.py sends one through a
    real Envoy), and no tracing block would start new traces in its place."""
    documents = list(yaml.safe_load_all((ROOT / path).read_text()))
    trees = documents + [yaml.safe_load(data) for document in documents if isinstance(document, dict)
                         for data in (document.get("data") or {}).values() if isinstance(data, str)]
    removed = {str(header).lower() for tree in trees for key in ("request_headers_to_remove",)
               for headers in _values(tree, key) for header in headers}
    assert not removed & {"traceparent", "tracestate"}
    assert not [tree for tree in trees if _values(tree, "tracing")]
