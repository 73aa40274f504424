"""Idle expiry: a stream untouched for the configured time is forgotten, and starts again from zero."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from devkit.native_calls import outputs, predict
from devkit.processes import wait_until
from devkit.references import TOLERANCE, keras_whole_sequence
from lstm_stream.v1 import stream_pb2 as pb
from server.config import DEFAULT_MODEL


@pytest.mark.timeout(120)
def test_idle_stream_expires(start_server) -> None:
    server = start_server("--state-ttl-s", "1.5")
    stream = f"ttl-{uuid.uuid4().hex[:8]}"
    x = np.random.default_rng(1).normal(size=(10, 1)).astype(np.float32)
    predict(server.stub, stream, x)
    info = server.stub.GetStream(pb.GetStreamRequest(stream_id=stream))
    assert info.exists and 0 < info.expires_in_ms <= 1500
    # Each chunk renews the expiry.
    predict(server.stub, stream, x)
    assert server.stub.GetStream(pb.GetStreamRequest(stream_id=stream)).offset == 20
    wait_until(lambda: not server.stub.GetStream(pb.GetStreamRequest(stream_id=stream)).exists, 10, "expiry")
    reply = predict(server.stub, stream, x, start_offset=0)
    assert reply.offset == 10
    assert np.max(np.abs(outputs(reply) - keras_whole_sequence(DEFAULT_MODEL, x))) <= TOLERANCE
