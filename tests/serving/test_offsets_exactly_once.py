"""Invariant 4 (docs/invariants.md): offsets, retries answered again without being applied twice, gaps refused."""

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


def test_duplicate_retry_is_replayed_not_applied_twice(default_server) -> None:
    stub, stream = default_server.stub, f"dup-{uuid.uuid4().hex[:8]}"
    x = x_of(1, 45)
    predict(stub, stream, x[:20], start_offset=0)
    applied = predict(stub, stream, x[20:35], start_offset=20)
    retry = predict(stub, stream, x[20:35], start_offset=20)
    assert not applied.replayed and retry.replayed
    assert retry.offset == applied.offset == 35
    np.testing.assert_array_equal(outputs(retry), outputs(applied))
    assert stub.GetStream(pb.GetStreamRequest(stream_id=stream)).offset == 35
    last = predict(stub, stream, x[35:], start_offset=35)
    got = np.concatenate([outputs(applied), outputs(last)])
    expected = keras_whole_sequence(DEFAULT_MODEL, x)[20:]
    assert np.max(np.abs(got - expected)) <= TOLERANCE


def test_retry_without_offset_is_recognised_by_request_id(default_server) -> None:
    stub, stream = default_server.stub, f"rid-{uuid.uuid4().hex[:8]}"
    x = x_of(2, 30)
    predict(stub, stream, x[:10], request_id="r1")
    first = predict(stub, stream, x[10:], request_id="r2")
    again = predict(stub, stream, x[10:], request_id="r2")
    assert again.replayed and again.request_id == "r2" and again.offset == 30
    np.testing.assert_array_equal(outputs(again), outputs(first))
    # Without a request id, the same data is a new chunk appended where the stream stands.
    appended = predict(stub, stream, x[10:])
    assert not appended.replayed and appended.offset == 50


def test_gap_and_stale_offsets_are_refused_with_the_current_offset(default_server) -> None:
    stub, stream = default_server.stub, f"gap-{uuid.uuid4().hex[:8]}"
    x = x_of(3, 30)
    predict(stub, stream, x[:10], start_offset=0)
    for wrong in (11, 5, 0):
        code, message, metadata = status_of(stub.Predict, request(stream, x[10:20], start_offset=wrong))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "offset 10" in message and metadata[OFFSET_METADATA_KEY] == "10"
    # A retry of the last chunk with other data is not a retry.
    code, _, metadata = status_of(stub.Predict, request(stream, x[20:30], start_offset=0))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and metadata[OFFSET_METADATA_KEY] == "10"
    assert stub.GetStream(pb.GetStreamRequest(stream_id=stream)).offset == 10
    assert predict(stub, stream, x[10:20], start_offset=10).offset == 20


def test_first_chunk_of_a_new_stream_must_start_at_zero(default_server) -> None:
    stub, stream = default_server.stub, f"new-{uuid.uuid4().hex[:8]}"
    code, _, metadata = status_of(stub.Predict, request(stream, x_of(4, 5), start_offset=7))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and metadata[OFFSET_METADATA_KEY] == "0"
    assert not stub.GetStream(pb.GetStreamRequest(stream_id=stream)).exists


def test_stream_errors_arrive_in_order_and_the_stream_goes_on(default_server) -> None:
    stub, stream = default_server.stub, f"sv-{uuid.uuid4().hex[:8]}"
    x = x_of(5, 30)
    messages = [
        request(stream, x[:10], start_offset=0, request_id="a"),
        request(stream, x[10:20], start_offset=99, request_id="b"),
        request(stream, x[10:20].ravel()[:3].reshape(3, 1), request_id="c"),
        pb.PredictRequest(stream_id=stream, values=[1.0, 2.0], timesteps=1, request_id="d"),
        request(stream, x[10:20], start_offset=10, request_id="e"),
        request(stream, x[10:20], start_offset=10, request_id="f"),
    ]
    replies = list(stub.PredictStream(iter(messages), timeout=60))
    assert [r.request_id for r in replies] == ["a", "b", "c", "d", "e", "f"]
    assert replies[1].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and replies[1].offset == 10
    assert not replies[2].HasField("error") and replies[2].offset == 13
    assert replies[3].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "values" in replies[3].error.message
    assert replies[4].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and replies[4].offset == 13
    assert replies[5].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
