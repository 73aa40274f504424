"""Invariant 10 (docs/invariants.md): a late duplicate of an earlier chunk of the current sequence,
the reset chunk that began it included, changes nothing and gets a clear answer: a replay of its own
answer while the answer is kept (the last --replay-window chunks, invariant 11), a refusal after."""

from __future__ import annotations

import uuid

import grpc
import numpy as np
import pytest

from devkit.native_calls import outputs, predict, request, status_of
from devkit.references import TOLERANCE, keras_whole_sequence
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.wire import OFFSET_METADATA_KEY
from server.config import DEFAULT_MODEL, ServerConfig

pytestmark = pytest.mark.timeout(120)


def x_of(seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(length, 1)).astype(np.float32)


def offset(stub, stream: str) -> int:
    return stub.GetStream(pb.GetStreamRequest(stream_id=stream), timeout=10).offset


# The default server keeps the answers of a sequence's last K chunks (invariant 11): a late copy of one of
# them is answered as a retry (its own outputs, `replayed`, nothing changes); an older copy is refused.
K = ServerConfig().replay_window
STEP = 4
CHUNKS = K + 2  # the first two chunks' answers are no longer kept


def send_sequence(stub, stream: str, x: np.ndarray, **first: object) -> list[pb.PredictResponse]:
    """The sequence's CHUNKS chunks: a reset first (with `first`'s fields), then each with its offset."""
    replies = [predict(stub, stream, x[:STEP], reset=True, **first)]
    replies += [predict(stub, stream, x[n:n + STEP], start_offset=n) for n in range(STEP, CHUNKS * STEP, STEP)]
    return replies


@pytest.mark.parametrize("with_offset", [True, False], ids=["reset-at-0", "reset-without-offset"])
def test_a_late_copy_of_the_reset_chunk_does_not_rewind_the_stream(default_server, with_offset) -> None:
    stub, stream = default_server.stub, f"late-{uuid.uuid4().hex[:8]}"
    x = x_of(1, (CHUNKS + 1) * STEP)
    start = {"start_offset": 0} if with_offset else {}
    got = [outputs(r) for r in send_sequence(stub, stream, x, **start)]
    end = CHUNKS * STEP
    code, message, metadata = status_of(stub.Predict, request(stream, x[:STEP], reset=True, **start))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "late duplicate" in message and "started the current sequence" in message
    assert metadata[OFFSET_METADATA_KEY] == str(end)
    assert offset(stub, stream) == end
    got.append(outputs(predict(stub, stream, x[end:], start_offset=end)))
    assert np.max(np.abs(np.concatenate(got) - keras_whole_sequence(DEFAULT_MODEL, x))) <= TOLERANCE


def test_late_copies_of_other_chunks_are_replayed_inside_the_window_and_refused_before_it(default_server) -> None:
    stub, stream = default_server.stub, f"late-{uuid.uuid4().hex[:8]}"
    x = x_of(2, CHUNKS * STEP)
    replies = send_sequence(stub, stream, x, start_offset=0)
    end = CHUNKS * STEP
    code, message, metadata = status_of(stub.Predict, request(stream, x[STEP:2 * STEP], start_offset=STEP))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no longer kept" in message, message
    assert metadata[OFFSET_METADATA_KEY] == str(end) and offset(stub, stream) == end
    for n in (2, CHUNKS - 1):  # the oldest answer kept and the newest
        copy = predict(stub, stream, x[n * STEP:(n + 1) * STEP], start_offset=n * STEP)
        assert copy.replayed and copy.offset == (n + 1) * STEP
        np.testing.assert_array_equal(outputs(copy), outputs(replies[n]))
    assert offset(stub, stream) == end


def test_append_mode_chunks_with_a_request_id_are_recognised(default_server) -> None:
    stub, stream = default_server.stub, f"late-{uuid.uuid4().hex[:8]}"
    x = x_of(3, (CHUNKS + 1) * STEP)
    got = [outputs(predict(stub, stream, x[:STEP], reset=True, request_id="r0"))]
    got += [outputs(predict(stub, stream, x[n:n + STEP], request_id=f"r{n}")) for n in range(STEP, CHUNKS * STEP, STEP)]
    end = CHUNKS * STEP
    for late, rid in ((x[:STEP], "r0"), (x[STEP:2 * STEP], f"r{STEP}")):  # older than the window: refused
        code, message, metadata = status_of(stub.Predict, request(stream, late, request_id=rid,
                                                                   reset=rid == "r0"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "late duplicate" in message, message
        assert metadata[OFFSET_METADATA_KEY] == str(end)
    inside = predict(stub, stream, x[2 * STEP:3 * STEP], request_id=f"r{2 * STEP}")  # kept: replayed
    assert inside.replayed and inside.offset == 3 * STEP
    assert offset(stub, stream) == end
    got.append(outputs(predict(stub, stream, x[end:], request_id=f"r{end}")))
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
