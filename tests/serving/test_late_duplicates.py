"""Invariant 10 (docs/invariants.md): a late duplicate of an earlier chunk of the current sequence,
the reset chunk that began it included, changes nothing and gets a clear answer."""

from __future__ import annotations

import uuid

import grpc
import numpy as np
import pytest

from devkit.native_calls import outputs, predict, request, status_of
from devkit.references import TOLERANCE, keras_whole_sequence
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.wire import OFFSET_METADATA_KEY
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(120)


def x_of(seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(length, 1)).astype(np.float32)


def offset(stub, stream: str) -> int:
    return stub.GetStream(pb.GetStreamRequest(stream_id=stream), timeout=10).offset


@pytest.mark.parametrize("with_offset", [True, False], ids=["reset-at-0", "reset-without-offset"])
def test_a_late_copy_of_the_reset_chunk_does_not_rewind_the_stream(default_server, with_offset) -> None:
    stub, stream = default_server.stub, f"late-{uuid.uuid4().hex[:8]}"
    x = x_of(1, 40)
    start = {"start_offset": 0} if with_offset else {}
    got = [outputs(predict(stub, stream, x[:10], reset=True, **start))]
    got.append(outputs(predict(stub, stream, x[10:20], start_offset=10)))
    got.append(outputs(predict(stub, stream, x[20:30], start_offset=20)))
    code, message, metadata = status_of(stub.Predict, request(stream, x[:10], reset=True, **start))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "late duplicate" in message and "started the current sequence" in message
    assert metadata[OFFSET_METADATA_KEY] == "30"
    assert offset(stub, stream) == 30
    got.append(outputs(predict(stub, stream, x[30:], start_offset=30)))
    assert np.max(np.abs(np.concatenate(got) - keras_whole_sequence(DEFAULT_MODEL, x))) <= TOLERANCE


def test_late_copies_of_other_chunks_are_refused(default_server) -> None:
    stub, stream = default_server.stub, f"late-{uuid.uuid4().hex[:8]}"
    x = x_of(2, 40)
    predict(stub, stream, x[:10], start_offset=0, reset=True)
    predict(stub, stream, x[10:20], start_offset=10)
    predict(stub, stream, x[20:30], start_offset=20)
    code, message, metadata = status_of(stub.Predict, request(stream, x[10:20], start_offset=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "late duplicate" in message
    assert metadata[OFFSET_METADATA_KEY] == "30" and offset(stub, stream) == 30


def test_append_mode_chunks_with_a_request_id_are_recognised(default_server) -> None:
    stub, stream = default_server.stub, f"late-{uuid.uuid4().hex[:8]}"
    x = x_of(3, 40)
    got = [outputs(predict(stub, stream, x[:10], reset=True, request_id="r0"))]
    got += [outputs(predict(stub, stream, x[n:n + 10], request_id=f"r{n}")) for n in (10, 20)]
    for late, rid in ((x[:10], "r0"), (x[10:20], "r10")):
        code, message, metadata = status_of(stub.Predict, request(stream, late, request_id=rid,
                                                                   reset=rid == "r0"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "late duplicate" in message, message
        assert metadata[OFFSET_METADATA_KEY] == "30"
    assert offset(stub, stream) == 30
    got.append(outputs(predict(stub, stream, x[30:], request_id="r30")))
    assert np.max(np.abs(np.concatenate(got) - keras_whole_sequence(DEFAULT_MODEL, x))) <= TOLERANCE


def test_a_deliberate_restart_with_the_same_data(default_server) -> None:
    # docs/api.md, "Late duplicates": a new request_id, or ResetStream, restarts a stream with identical data.
    stub, stream = default_server.stub, f"again-{uuid.uuid4().hex[:8]}"
    x = x_of(4, 20)
    first = predict(stub, stream, x[:10], start_offset=0, reset=True, request_id="run-1")
    predict(stub, stream, x[10:], start_offset=10)
    again = predict(stub, stream, x[:10], start_offset=0, reset=True, request_id="run-2")
    assert not again.replayed and again.offset == 10
    np.testing.assert_array_equal(outputs(again), outputs(first))
    predict(stub, stream, x[10:], start_offset=10)
    stub.ResetStream(pb.ResetStreamRequest(stream_id=stream), timeout=10)
    assert not predict(stub, stream, x[:10], start_offset=0, reset=True, request_id="run-2").replayed


def test_a_retried_reset_chunk_is_replayed_while_it_is_the_last(default_server) -> None:
    stub, stream = default_server.stub, f"again-{uuid.uuid4().hex[:8]}"
    x = x_of(5, 10)
    first = predict(stub, stream, x, reset=True)
    retry = predict(stub, stream, x, reset=True)
    assert retry.replayed and retry.offset == 10 == offset(stub, stream)
    np.testing.assert_array_equal(outputs(retry), outputs(first))
