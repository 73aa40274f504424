"""Invariant 7 (docs/invariants.md): a slot written by one model is never silently fed to another."""

from __future__ import annotations

import uuid

import grpc
import numpy as np
import pytest

from devkit.native_calls import outputs, predict, request, status_of
from devkit.references import TOLERANCE, keras_whole_sequence
from devkit.small_models import build_lstm
from lstm_stream.v1 import stream_pb2 as pb

pytestmark = pytest.mark.timeout(240)


def test_slot_of_another_model_is_refused_then_reset_on_request(start_server, redis_server, tmp_path) -> None:
    first_model = build_lstm(tmp_path / "a.keras", seed=1)
    second_model = build_lstm(tmp_path / "b.keras", seed=2)  # same shape, other weights
    stream, other = f"fp-{uuid.uuid4().hex[:8]}", f"fp-auto-{uuid.uuid4().hex[:8]}"
    x = np.random.default_rng(1).normal(size=(20, 1)).astype(np.float32)

    # One server on the first model writes both streams' slots (one start-up, not two).
    first = start_server(model=first_model)
    predict(first.stub, stream, x[:10])
    predict(first.stub, other, x[:10])
    first_fingerprint = first.stub.GetModel(pb.GetModelRequest()).fingerprint
    first.stop()

    second = start_server(model=second_model)
    assert second.stub.GetModel(pb.GetModelRequest()).fingerprint != first_fingerprint
    code, message, _ = status_of(second.stub.Predict, request(stream, x[10:]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "another model" in message and "ResetStream" in message
    assert second.stub.GetStream(pb.GetStreamRequest(stream_id=stream)).model_fingerprint == first_fingerprint
    # reset=True is the user saying "start again": allowed.
    reply = predict(second.stub, stream, x[10:], reset=True)
    assert np.max(np.abs(outputs(reply) - keras_whole_sequence(second_model, x[10:]))) <= TOLERANCE
    second.stop()

    # With --reset-on-model-change such slots start from zero instead of being refused.
    auto = start_server("--reset-on-model-change", model=second_model)
    reply = predict(auto.stub, other, x[10:])
    assert reply.offset == 10
    assert np.max(np.abs(outputs(reply) - keras_whole_sequence(second_model, x[10:]))) <= TOLERANCE
