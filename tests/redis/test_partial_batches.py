"""A batch save is all-or-nothing per stream and never fails the other streams of the batch.

A key of another Redis type under one stream's name (a hash, a list: another program writing under
the key prefix) fails that stream alone with a clear error; every other stream of the same batch is
saved and answered normally, and later batches with that stream go on working for the others.
(Invariants 2 and 9, docs/invariants.md; issue 8 item 2.)
"""

from __future__ import annotations

import uuid

import grpc
import numpy as np
import pytest

from devkit.native_calls import outputs, request
from devkit.references import TOLERANCE, keras_whole_sequence
from lstm_stream.v1 import stream_pb2 as pb
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(180)


def test_a_wrong_type_key_fails_its_stream_alone(start_server, redis_server) -> None:
    # A 300 ms batching delay puts every chunk sent together into one batch.
    server = start_server("--max-delay-ms", "300")
    run = uuid.uuid4().hex[:6]
    good = [f"ok-{run}-{n}" for n in range(3)]
    bad = {f"hash-{run}": "hash", f"list-{run}": "list"}
    client = redis_server.client()
    client.hset(f"lstm:{{hash-{run}}}", "owner", "someone else")
    client.rpush(f"lstm:{{list-{run}}}", "theirs")
    x = np.random.default_rng(3).normal(size=(30, 1)).astype(np.float32)
    got: dict[str, list[np.ndarray]] = {s: [] for s in good}
    for start in (0, 10, 20):  # three batches, each with the bad streams among the good ones
        ids = [good[0], *bad, *good[1:]]
        messages = [request(s, x[start:start + 10], start_offset=start, reset=start == 0) for s in ids]
        replies = dict(zip(ids, server.stub.PredictStream(iter(messages), timeout=60), strict=True))
        for stream in good:
            assert not replies[stream].HasField("error"), replies[stream].error
            assert replies[stream].offset == start + 10
            got[stream].append(outputs(replies[stream]))
        for stream, kind in bad.items():
            error = replies[stream].error
            assert error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], error
            assert f"holds a {kind}" in error.message and "not applied" in error.message
    expected = keras_whole_sequence(DEFAULT_MODEL, x)
    for stream in good:
        assert np.max(np.abs(np.concatenate(got[stream]) - expected)) <= TOLERANCE
    # The other program's values are untouched; inspecting the stream names the problem.
    assert client.hget(f"lstm:{{hash-{run}}}", "owner") == b"someone else"
    assert client.lrange(f"lstm:{{list-{run}}}", 0, -1) == [b"theirs"]
    with pytest.raises(grpc.RpcError) as raised:
        server.stub.GetStream(pb.GetStreamRequest(stream_id=f"hash-{run}"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "holds a hash" in raised.value.details()
    # ResetStream clears the key; the stream then starts normally.
    server.stub.ResetStream(pb.ResetStreamRequest(stream_id=f"hash-{run}"), timeout=10)
    reply = server.stub.Predict(request(f"hash-{run}", x[:10], start_offset=0), timeout=30)
    assert reply.offset == 10
