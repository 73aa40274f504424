"""Invariant 6 (docs/invariants.md): bad input gets INVALID_ARGUMENT naming the field, and changes nothing."""

from __future__ import annotations

import uuid

import grpc
import numpy as np
import pytest

from devkit.native_calls import predict, request, status_of
from lstm_stream.v1 import stream_pb2 as pb

pytestmark = pytest.mark.timeout(120)

GOOD = np.zeros((4, 1), np.float32)


def bad_requests(stream: str, max_timesteps: int) -> list[tuple[str, pb.PredictRequest, str]]:
    """(what, request, a word the error must contain)"""
    too_long = np.zeros((max_timesteps + 1, 1), np.float32)
    with_nan = GOOD.copy()
    with_nan[2, 0] = np.nan
    with_inf = GOOD.copy()
    with_inf[1, 0] = np.inf
    return [
        ("too few values", pb.PredictRequest(stream_id=stream, values=[1, 2, 3], timesteps=4), "values"),
        ("too many values", pb.PredictRequest(stream_id=stream, values=[1] * 5, timesteps=4), "values"),
        ("no timesteps", pb.PredictRequest(stream_id=stream, values=[], timesteps=0), "timesteps"),
        ("values but timesteps 0", pb.PredictRequest(stream_id=stream, values=[1.0], timesteps=0), "timesteps"),
        ("oversized chunk", request(stream, too_long), "timesteps"),
        ("NaN", request(stream, with_nan), "values"),
        ("Inf", request(stream, with_inf), "values"),
        ("empty stream id", request("", GOOD), "stream_id"),
        ("overlong stream id", request("s" * 257, GOOD), "stream_id"),
        ("overlong in UTF-8 bytes", request("é" * 129, GOOD), "stream_id"),
        ("control character", request("a\x01b", GOOD), "stream_id"),
        ("newline in stream id", request("a\nb", GOOD), "stream_id"),
        ("DEL in stream id", request("a\x7fb", GOOD), "stream_id"),
        ("C1 control in stream id", request("a\x85b", GOOD), "stream_id"),
        ("reset with an offset", request(stream, GOOD, start_offset=3, reset=True), "start_offset"),
        ("overlong request id", request(stream, GOOD, request_id="r" * 257), "request_id"),
    ]


def test_each_bad_request_is_refused_and_changes_nothing(default_server) -> None:
    stub = default_server.stub
    stream = f"bad-{uuid.uuid4().hex[:8]}"
    before = predict(stub, stream, GOOD, start_offset=0)
    max_timesteps = stub.GetModel(pb.GetModelRequest()).max_chunk_timesteps
    for what, message, field in bad_requests(stream, max_timesteps):
        code, details, _ = status_of(stub.Predict, message, timeout=30)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, what
        assert details.startswith(field), f"{what}: {details}"
        info = stub.GetStream(pb.GetStreamRequest(stream_id=stream))
        assert info.offset == before.offset == 4, what
    # The stream continues exactly where it stood.
    assert predict(stub, stream, GOOD, start_offset=4).offset == 8


def test_bad_stream_ids_are_refused_by_every_method(default_server) -> None:
    stub = default_server.stub
    for call, message in ((stub.ResetStream, pb.ResetStreamRequest(stream_id="")),
                          (stub.GetStream, pb.GetStreamRequest(stream_id="x" * 300))):
        code, details, _ = status_of(call, message, timeout=30)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("stream_id")


def test_bad_requests_on_a_stream_connection_answer_errors_and_keep_it_open(default_server) -> None:
    stub = default_server.stub
    stream = f"bad-stream-{uuid.uuid4().hex[:8]}"
    messages = [m for _, m, _ in bad_requests(stream, 1024)] + [request(stream, GOOD, start_offset=0)]
    replies = list(stub.PredictStream(iter(messages), timeout=60))
    assert len(replies) == len(messages)
    assert all(r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for r in replies[:-1])
    assert not replies[-1].HasField("error") and replies[-1].offset == 4
