"""Prometheus metrics of a running server, and the Grafana dashboard built on them.

Every outcome of every call is counted by protocol, method and code, refusals before the data plane
(INVALID_ARGUMENT, NOT_FOUND) included and stream messages one by one; the latency histogram moves;
the gauges are present; and every query in deploy/grafana/dashboards/lstm-serve.json names a metric
the server exports, with labels it has.
"""

from __future__ import annotations

import json
import re
import urllib.request
import uuid

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devkit import ROOT
from devkit.metrics import scrape, value
from devkit.native_calls import predict, request, status_of
from devkit.peers import triton_messages
from lstm_stream.v1 import stream_pb2 as pb
from server import metrics as server_metrics

triton_pb, triton_grpc = triton_messages()  # whichever copy this process has: see devkit/peers.py
pytestmark = pytest.mark.timeout(60)
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "lstm-serve.json"
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "gauge": ("",), "info": ("_info",), "summary": ("", "_sum", "_count", "_created")}


def test_every_outcome_is_counted_by_protocol_method_and_code(default_server) -> None:
    before = scrape(default_server)
    stream = f"m-{uuid.uuid4().hex[:8]}"
    predict(default_server.stub, stream, np.zeros((4, 1), np.float32))
    # Refused before the data plane: the old lstm_serve_chunks_total never saw these.
    code, _, _ = status_of(predict, default_server.stub, stream, np.zeros((4, 2), np.float32))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    triton = triton_grpc.GRPCInferenceServiceStub(default_server.channel)
    code, _, _ = status_of(triton.ModelInfer, triton_pb.ModelInferRequest(model_name="no-such-model"), timeout=5)
    assert code == grpc.StatusCode.NOT_FOUND
    # A stream: one good message and one bad one, each counted under its own code.
    answers = list(default_server.stub.PredictStream(iter([
        request(stream, np.zeros((2, 1), np.float32)), request(stream, np.zeros((0, 1), np.float32))]), timeout=10))
    assert [a.HasField("error") for a in answers] == [False, True]
    after = scrape(default_server)

    def grew(name: str, by: float = 1, **labels: str) -> bool:
        return value(after, name, **labels) - value(before, name, **labels) >= by

    calls = "lstm_serve_requests_total"
    assert grew(calls, protocol="native", method="Predict", code="OK")
    assert grew(calls, protocol="native", method="Predict", code="INVALID_ARGUMENT")
    assert grew(calls, protocol="triton", method="ModelInfer", code="NOT_FOUND")
    assert grew(calls, protocol="native", method="PredictStream", code="OK")
    assert grew(calls, protocol="native", method="PredictStream", code="INVALID_ARGUMENT")
    assert grew("lstm_serve_streams_total", protocol="native", method="PredictStream", code="OK")
    # The latency histogram moves: one observation per unary call and per stream message.
    assert grew("lstm_serve_request_seconds_count", 2, protocol="native", method="Predict")
    assert grew("lstm_serve_request_seconds_count", 2, protocol="native", method="PredictStream")
    assert grew("lstm_serve_queue_wait_seconds_count", 2)
    assert grew("lstm_serve_chunks_total", 2, outcome="ok")
    # Gauges read at scrape time, Redis and the model.
    assert value(after, "lstm_serve_queued_chunks") == 0 and value(after, "lstm_serve_in_flight_chunks") == 0
    assert value(after, "lstm_serve_open_streams", protocol="native") == 0
    assert value(after, "lstm_serve_redis_up") == 1 and value(after, "lstm_serve_ready") == 1
    assert value(after, "lstm_serve_redis_ping_seconds_count") >= 1
    # Redis' own memory, read by the health tracker (INFO memory): a real redis-server uses a few hundred KiB at least.
    assert value(after, "lstm_serve_redis_used_memory_bytes") > 100_000
    info = default_server.stub.GetModel(pb.GetModelRequest(), timeout=5)
    (labels,) = after["lstm_serve_model_info"]
    assert dict(labels)["fingerprint"] == info.fingerprint and dict(labels)["name"] == info.name


def _exported(server) -> set[str]:
    """Sample names the server exports, from each family's type (labelled families without samples too)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names


def _labels_of(sample_name: str) -> set[str]:
    # The metric whose name is the longest prefix of the sample's (lstm_serve_model_calls_total is not
    # lstm_serve_model), leaving out labelled children (.labels(...)), which carry no label names.
    collectors = [c for c in vars(server_metrics).values()
                  if isinstance(getattr(c, "_name", None), str) and not getattr(c, "_labelvalues", ())
                  and sample_name.startswith(c._name)]
    if not collectors:
        return set()
    collector = max(collectors, key=lambda c: len(c._name))
    return set(getattr(collector, "_labelnames", ())) | ({"le"} if sample_name.endswith("_bucket") else set())


def test_the_dashboard_queries_only_exported_metrics(default_server) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    assert len(queries) >= 10
    exported = _exported(default_server)
    for query in queries:
        used = set(re.findall(r"\blstm_serve_\w+", query))
        assert used, f"a dashboard query names no lstm_serve metric: {query}"
        missing = used - exported
        assert not missing, f"{query!r} names metrics the server does not export: {sorted(missing)}"
        # Labels it groups or filters by exist on the metrics it names (instance and job come from Prometheus).
        labels = set().union(*(_labels_of(name) for name in used)) | {"instance", "job"}
        grouped = {label.strip() for clause in re.findall(r"by \(([^)]*)\)", query) for label in clause.split(",")}
        filtered = set(re.findall(r"(\w+)\s*(?:=~|!=|=)\s*\"", query))
        assert grouped | filtered <= labels, f"{query!r} uses labels {sorted((grouped | filtered) - labels)}"
