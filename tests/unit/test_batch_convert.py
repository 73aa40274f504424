"""PredictBatch conversion in process (server/api/batch_convert.py): the values block split by each chunk's
timesteps, each chunk judged alone (invariant 17, docs/invariants.md), and the answer's outputs in one block."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from lstm_stream.v1 import stream_pb2 as pb
from server.api.batch_convert import BatchLimits, batch_chunks, batch_response
from server.errors import ServiceError
from server.types import Chunk, Prediction

pytestmark = pytest.mark.timeout(30)
LIMITS = BatchLimits(chunks=16, timesteps=1000)


def message(timesteps: list[int], values: np.ndarray, features: int = 2) -> pb.PredictBatchRequest:
    assert values.size == sum(timesteps) * features
    return pb.PredictBatchRequest(
        chunks=[pb.PredictRequest(stream_id=f"s{i}", timesteps=t, start_offset=0) for i, t in enumerate(timesteps)],
        values=values.astype("<f4").tobytes())


def convert(request: pb.PredictBatchRequest, features: int = 2) -> list[Chunk | ServiceError]:
    return batch_chunks(request, models=lambda name: ("m", features), max_timesteps=8, limits=LIMITS, tenant="t",
                        deadline=1.0)


def two_models(name: str) -> tuple[str, int]:
    """A server of two models: "narrow" takes 1 feature, "wide" 3; any other name is not served."""
    shapes = {"narrow": 1, "wide": 3}
    if name not in shapes:
        raise ServiceError(grpc.StatusCode.NOT_FOUND, f"model {name!r} is not served here")
    return name, shapes[name]


def test_chunks_of_several_models_take_their_own_models_features_from_one_block() -> None:
    request = pb.PredictBatchRequest(chunks=[
        pb.PredictRequest(stream_id="a", timesteps=2, model="wide"),
        pb.PredictRequest(stream_id="b", timesteps=3, model="narrow", model_version=2),
        pb.PredictRequest(stream_id="c", timesteps=1, model="wide"),
    ], values=np.arange(2 * 3 + 3 * 1 + 1 * 3, dtype="<f4").tobytes())
    a, b, c = batch_chunks(request, models=two_models, max_timesteps=8, limits=LIMITS, tenant="", deadline=1.0)
    assert isinstance(a, Chunk) and isinstance(b, Chunk) and isinstance(c, Chunk)
    np.testing.assert_array_equal(a.values, np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(b.values, np.arange(6, 9).reshape(3, 1))
    np.testing.assert_array_equal(c.values, np.arange(9, 12).reshape(1, 3))
    assert (a.model, b.model, b.model_version) == ("wide", "narrow", 2)
    # An unknown model: in a block its slice cannot be told, so the message is refused whole, naming the chunk;
    # with each chunk's own values it fails alone.
    request.chunks[1].model = "nope"
    with pytest.raises(ServiceError) as refused:
        batch_chunks(request, models=two_models, max_timesteps=8, limits=LIMITS, tenant="", deadline=1.0)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and "chunks[1].model" in refused.value.message
    request.values = b""
    request.chunks[0].values.extend([0.0] * 6)
    request.chunks[1].values.extend([0.0] * 3)
    request.chunks[2].values.extend([0.0] * 3)
    a, b, c = batch_chunks(request, models=two_models, max_timesteps=8, limits=LIMITS, tenant="", deadline=1.0)
    assert isinstance(a, Chunk) and isinstance(c, Chunk)
    assert isinstance(b, ServiceError) and b.code == grpc.StatusCode.NOT_FOUND


def test_the_block_is_split_by_each_chunks_timesteps_and_bad_chunks_fail_alone() -> None:
    timesteps = [3, 0, 2, 9, 4, 1]
    values = np.arange(sum(timesteps) * 2, dtype=np.float32)
    values[2 * 3] = np.nan  # the third chunk's first value (after 3 + 0 timesteps): on the boundary
    values[-1] = np.inf  # the last chunk's
    chunks = convert(message(timesteps, values))
    assert [type(c).__name__ for c in chunks] == ["Chunk", "ServiceError", "ServiceError", "ServiceError",
                                                  "Chunk", "ServiceError"]
    first, fifth = chunks[0], chunks[4]
    assert isinstance(first, Chunk) and isinstance(fifth, Chunk)
    np.testing.assert_array_equal(first.values, values[:6].reshape(3, 2))
    np.testing.assert_array_equal(fifth.values, values[2 * 14:2 * 18].reshape(4, 2))
    assert (first.stream_id, first.tenant, first.deadline, first.start_offset) == ("s0", "t", 1.0, 0)
    errors = [c for c in chunks if isinstance(c, ServiceError)]
    assert all(e.code == grpc.StatusCode.INVALID_ARGUMENT for e in errors)
    assert "timesteps: must be at least 1" in errors[0].message
    assert "value 0 (timestep 0, feature 0) is nan" in errors[1].message
    assert "timesteps: is 9; a chunk holds at most 8" in errors[2].message
    assert "value 1 (timestep 0, feature 1) is inf" in errors[3].message


def test_a_block_of_the_wrong_size_or_too_many_chunks_refuses_the_message() -> None:
    request = message([2, 2], np.zeros(8, np.float32))
    request.values = request.values[:-4]
    with pytest.raises(ServiceError, match="values: has 7 values; the chunks' timesteps add up to 4"):
        convert(request)
    with pytest.raises(ServiceError, match="--max-batch-chunks"):
        convert(message([1] * 17, np.zeros(34, np.float32)))
    with pytest.raises(ServiceError, match="--max-batch-timesteps"):
        batch_chunks(message([8] * 16, np.zeros(256, np.float32)), models=lambda name: ("m", 2), max_timesteps=8,
                     limits=BatchLimits(chunks=16, timesteps=100), tenant="", deadline=1.0)


def test_the_answer_is_one_block_in_request_order_with_errors_in_place() -> None:
    request = message([2, 1, 3], np.zeros(12, np.float32))
    answers: list[Prediction | ServiceError] = [
        Prediction("s0", np.array([[1.0], [2.0]], np.float32), 2),
        ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "offset", current_offset=7),
        Prediction("s2", np.array([[3.0], [4.0], [5.0]], np.float32), 3, replayed=True),
    ]
    response = batch_response(request, answers)
    np.testing.assert_array_equal(np.frombuffer(response.outputs, "<f4"), [1, 2, 3, 4, 5])
    first, failed, last = response.results
    assert (first.timesteps, first.output_size, first.offset, list(first.outputs)) == (2, 1, 2, [])
    assert failed.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and failed.offset == 7
    assert failed.stream_id == "s1" and not failed.outputs
    assert last.replayed and last.offset == 3
