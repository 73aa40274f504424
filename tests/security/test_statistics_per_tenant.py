"""Triton's ModelStatistics with API keys: each tenant sees its own requests' counts, never another's
(invariant 13, docs/invariants.md; docs/security.md). Without keys the statistics count every request,
as before (tests/serving/test_triton_protocol.py).

Triton messages come from `devkit.peers.triton_messages()`.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from devkit.peers import triton_messages
from devkit.processes import RedisServer, ServerProcess
from server.config import DEFAULT_MODEL
from tests.security.test_security import new_id, sequence

triton_pb2, triton_pb2_grpc = triton_messages()
pytestmark = pytest.mark.timeout(180)

TIMEOUT_S = 60
KEYS = {tenant: f"{tenant}-{secrets.token_hex(16)}" for tenant in ("north", "south", "idle")}


def bearer(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


def infer_request(x: np.ndarray, stream: str | None = None, *, start: bool = True) -> object:
    message = triton_pb2.ModelInferRequest(model_name="default", raw_input_contents=[x.astype("<f4").tobytes()])
    message.inputs.add(name="INPUT", datatype="FP32", shape=list(x.shape))
    if stream is not None:
        message.parameters["sequence_id"].string_param = stream
        message.parameters["sequence_start"].bool_param = start
    return message


@pytest.fixture(scope="module")
def server(redis_server: RedisServer) -> Iterator[ServerProcess]:
    keys = Path(tempfile.mkdtemp(prefix="lstm-stats-")) / "api-keys"
    keys.write_text("".join(f"{tenant} {key}\n" for tenant, key in KEYS.items()))
    server = ServerProcess(redis_server.url, DEFAULT_MODEL, "--api-keys", str(keys))
    yield server
    server.stop()


def test_each_tenant_sees_only_its_own_statistics(server: ServerProcess) -> None:
    stub = triton_pb2_grpc.GRPCInferenceServiceStub(server.channel)
    x = sequence(5, 4)

    # north: 2 unary requests, 1 over the stream, 1 refused (continues a sequence it never started).
    for _ in range(2):
        stub.ModelInfer(infer_request(x), metadata=bearer("north"), timeout=TIMEOUT_S)
    streamed = list(stub.ModelStreamInfer(iter([infer_request(x, new_id("north"))]), metadata=bearer("north"),
                                          timeout=TIMEOUT_S))
    assert len(streamed) == 1 and not streamed[0].error_message
    refused = list(stub.ModelStreamInfer(iter([infer_request(x, new_id("north"), start=False)]),
                                         metadata=bearer("north"), timeout=TIMEOUT_S))
    assert "FAILED_PRECONDITION" in refused[0].error_message
    # south: 5 unary requests.
    for _ in range(5):
        stub.ModelInfer(infer_request(x, new_id("south")), metadata=bearer("south"), timeout=TIMEOUT_S)

    def statistics(tenant: str, name: str = "default") -> object:
        reply = stub.ModelStatistics(triton_pb2.ModelStatisticsRequest(name=name), metadata=bearer(tenant),
                                     timeout=TIMEOUT_S)
        assert len(reply.model_stats) == 1
        return reply.model_stats[0]

    north, south, idle = statistics("north"), statistics("south"), statistics("idle", "")
    assert (north.inference_count, north.inference_stats.success.count, north.inference_stats.fail.count) == (3, 3, 1)
    assert north.inference_stats.queue.count == 3
    assert (south.inference_count, south.inference_stats.success.count, south.inference_stats.fail.count) == (5, 5, 0)
    assert south.execution_count >= 1 and south.last_inference > 0
    assert (idle.inference_count, idle.inference_stats.fail.count, idle.execution_count, idle.last_inference) == (
        0, 0, 0, 0)
    assert idle.name == "sensor_forecaster" and north.name == "default" and north.version == "1"
