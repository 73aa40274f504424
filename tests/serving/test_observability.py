"""Health, reflection and Prometheus metrics of a running server."""

from __future__ import annotations

import urllib.request
import uuid

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from devkit.native_calls import predict

pytestmark = pytest.mark.timeout(60)


def test_health_and_reflection(default_server) -> None:
    health = health_pb2_grpc.HealthStub(default_server.channel)
    for service in ("", "lstm_stream.v1.StreamInference"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(default_server.channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"lstm_stream.v1.StreamInference", "grpc.health.v1.Health"} <= names


def test_metrics_count_chunks_and_batches(default_server) -> None:
    stream = f"metrics-{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        predict(default_server.stub, stream, np.zeros((4, 1), np.float32))
    url = f"http://127.0.0.1:{default_server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    ok = [line for line in text.splitlines() if line.startswith('lstm_serve_chunks_total{outcome="ok"}')]
    assert ok and float(ok[0].split()[-1]) >= 3
    assert "lstm_serve_batch_chunks_bucket" in text and "lstm_serve_timesteps_total" in text
