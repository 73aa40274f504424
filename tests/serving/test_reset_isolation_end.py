"""Invariants 2 and 3, and `end`: streams never touch each other; a reset or an end starts a new sequence.

See docs/invariants.md.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from devkit.native_calls import outputs, predict
from devkit.references import TOLERANCE, keras_whole_sequence
from lstm_stream.v1 import stream_pb2 as pb
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(120)


def new_id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def sequence(seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(length, 1)).astype(np.float32)


def test_reset_stream_makes_the_next_chunk_a_fresh_sequence(default_server) -> None:
    stub, stream = default_server.stub, new_id("reset")
    predict(stub, stream, sequence(1, 40))
    assert stub.ResetStream(pb.ResetStreamRequest(stream_id=stream)).existed
    fresh = sequence(2, 25)
    reply = predict(stub, stream, fresh)
    assert reply.offset == 25
    assert np.max(np.abs(outputs(reply) - keras_whole_sequence(DEFAULT_MODEL, fresh))) <= TOLERANCE
    assert not stub.ResetStream(pb.ResetStreamRequest(stream_id=new_id("never-seen"))).existed


def test_reset_flag_zeroes_the_state_before_its_chunk(default_server) -> None:
    stub, stream = default_server.stub, new_id("reset-flag")
    predict(stub, stream, sequence(3, 30))
    fresh = sequence(4, 12)
    reply = predict(stub, stream, fresh, reset=True)
    assert reply.offset == 12
    assert np.max(np.abs(outputs(reply) - keras_whole_sequence(DEFAULT_MODEL, fresh))) <= TOLERANCE


def test_streams_are_isolated(default_server) -> None:
    stub = default_server.stub
    a, b = new_id("iso-a"), new_id("iso-b")
    xb = sequence(5, 60)
    alone = np.concatenate([outputs(predict(stub, b, xb[:30])), outputs(predict(stub, b, xb[30:]))])
    b2 = new_id("iso-b2")
    # The same sequence on another stream, with stream A busy between (and inside) its chunks.
    first = outputs(predict(stub, b2, xb[:30]))
    predict(stub, a, sequence(6, 50))
    stub.ResetStream(pb.ResetStreamRequest(stream_id=a))
    predict(stub, a, sequence(7, 10), end=True)
    second = outputs(predict(stub, b2, xb[30:]))
    np.testing.assert_array_equal(np.concatenate([first, second]), alone)


def test_end_deletes_the_state_after_its_chunk(default_server) -> None:
    stub, stream = default_server.stub, new_id("end")
    x = sequence(8, 50)
    predict(stub, stream, x[:20])
    last = predict(stub, stream, x[20:], end=True)
    expected = keras_whole_sequence(DEFAULT_MODEL, x)
    assert np.max(np.abs(outputs(last) - expected[20:])) <= TOLERANCE
    assert last.offset == 50
    assert not stub.GetStream(pb.GetStreamRequest(stream_id=stream)).exists
    # The next chunk begins a new sequence.
    fresh = sequence(9, 10)
    reply = predict(stub, stream, fresh)
    assert reply.offset == 10
    assert np.max(np.abs(outputs(reply) - keras_whole_sequence(DEFAULT_MODEL, fresh))) <= TOLERANCE


def test_get_stream_reports_offset_update_time_and_expiry(default_server) -> None:
    stub, stream = default_server.stub, new_id("info")
    info = stub.GetStream(pb.GetStreamRequest(stream_id=stream))
    assert not info.exists and info.offset == 0
    predict(stub, stream, sequence(10, 17))
    info = stub.GetStream(pb.GetStreamRequest(stream_id=stream))
    model = stub.GetModel(pb.GetModelRequest())
    assert info.exists and info.offset == 17
    assert info.updated_unix_ms > 1_700_000_000_000
    assert 0 < info.expires_in_ms <= 86_400_000
    assert info.model_fingerprint == model.fingerprint


def test_get_model_describes_the_default_model(default_server) -> None:
    model = default_server.stub.GetModel(pb.GetModelRequest())
    assert model.input_features == 1 and model.output_size == 1 and model.per_timestep_outputs
    assert [(layer.kind, layer.units) for layer in model.recurrent_layers] == [("LSTM", 64), ("LSTM", 64)]
    assert model.state_size == 2 * 2 * 64
    assert len(model.fingerprint) == 16 and model.max_chunk_timesteps >= 1
