"""Invariant 8: Redis down means UNAVAILABLE, no crash, and service resumes by itself when it returns.

See docs/invariants.md.
"""

from __future__ import annotations

import uuid

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devkit.native_calls import outputs, predict, request, status_of
from devkit.processes import RedisServer, wait_until
from devkit.references import TOLERANCE, keras_whole_sequence
from server.config import DEFAULT_MODEL


@pytest.mark.timeout(180)
def test_redis_outage_is_unavailable_then_heals(start_server) -> None:
    redis_server = RedisServer()  # its own, with appendfsync always: it is killed here
    try:
        server = start_server(redis_url=redis_server.url)
        health = health_pb2_grpc.HealthStub(server.channel)
        stream = f"fault-{uuid.uuid4().hex[:8]}"
        x = np.random.default_rng(1).normal(size=(30, 1)).astype(np.float32)
        first = predict(server.stub, stream, x[:10], start_offset=0)
        other = f"fault-{uuid.uuid4().hex[:8]}"
        predict(server.stub, other, x[:10], start_offset=0)

        redis_server.kill()
        # The server waits for Redis until the caller's deadline (invariant 9). The stream's slot is in the
        # server's memory (--slot-memory-mb), so the chunk's first Redis call is its save, sent on a
        # connection that died: whether it ran cannot be known.
        code, message, metadata = status_of(server.stub.Predict, request(stream, x[10:20], start_offset=10), timeout=3)
        assert code == grpc.StatusCode.UNAVAILABLE and "Redis" in message, message
        assert metadata["x-chunk-outcome"] == "unknown", message
        # From then on, until Redis answers again, every stream's slot is read first, this one's too: nothing
        # was applied, and the answer says so.
        for name in (other, stream):
            code, message, metadata = status_of(server.stub.Predict, request(name, x[10:20], start_offset=10),
                                                timeout=3)
            assert code == grpc.StatusCode.UNAVAILABLE and "Redis" in message and "not applied" in message
            assert metadata["x-chunk-outcome"] == "not-applied"
        wait_until(
            lambda: health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING,
            10, "health NOT_SERVING",
        )
        assert server.process.poll() is None

        redis_server.start()  # same port, same append-only file
        wait_until(
            lambda: health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING,
            15, "health SERVING again",
        )
        second = wait_until(lambda: _try(server.stub, stream, x[10:20], 10), 15, "Predict to work again")
        third = predict(server.stub, stream, x[20:], start_offset=20)
        got = np.concatenate([outputs(first), outputs(second), outputs(third)])
        assert np.max(np.abs(got - keras_whole_sequence(DEFAULT_MODEL, x))) <= TOLERANCE
    finally:
        redis_server.stop()


def _try(stub, stream, x, start):
    try:
        return predict(stub, stream, x, start_offset=start, timeout=5)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return None
