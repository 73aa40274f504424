"""Invariant 5: one compare-and-set per chunk; two replicas never both apply a chunk on the same base.

See docs/invariants.md.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from devkit.native_calls import outputs, predict, request
from devkit.references import TOLERANCE, keras_whole_sequences
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.wire import OFFSET_METADATA_KEY
from server.config import DEFAULT_MODEL

ROUNDS = 12


@pytest.mark.timeout(240)
def test_racing_replicas_apply_exactly_one_chunk(default_server, default_replica) -> None:
    replicas = [default_server, default_replica]
    rng = np.random.default_rng(4)
    checked: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (whole sequence, winner's answer, tail's)
    with ThreadPoolExecutor(2) as pool:
        for round_number in range(ROUNDS):
            stream = f"race-{round_number}-{uuid.uuid4().hex[:6]}"
            head = rng.normal(size=(5, 1)).astype(np.float32)
            predict(replicas[0].stub, stream, head, start_offset=0)
            rivals = [rng.normal(size=(8, 1)).astype(np.float32) for _ in replicas]
            calls = [pool.submit(r.stub.Predict, request(stream, x, start_offset=5), timeout=30)
                     for r, x in zip(replicas, rivals, strict=True)]
            winners, losers = [], []
            for call, x in zip(calls, rivals, strict=True):
                try:
                    winners.append((call.result(), x))
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
                    assert dict(error.trailing_metadata())[OFFSET_METADATA_KEY] == "13"
                    losers.append(x)
            assert len(winners) == 1 and len(losers) == 1
            reply, x = winners[0]
            assert reply.offset == 13
            assert replicas[1].stub.GetStream(pb.GetStreamRequest(stream_id=stream)).offset == 13
            # The saved state is the winner's, not a mix: continuing matches Keras on head + winner.
            tail = rng.normal(size=(4, 1)).astype(np.float32)
            last = predict(replicas[round_number % 2].stub, stream, tail, start_offset=13)
            checked.append((np.concatenate([head, x, tail]), outputs(reply), outputs(last)))
    # Keras' answers for every round in one call.
    references = keras_whole_sequences(DEFAULT_MODEL, [whole for whole, _, _ in checked])
    for (_, winner, continued), expected in zip(checked, references, strict=True):
        assert np.max(np.abs(winner - expected[5:13])) <= TOLERANCE
        assert np.max(np.abs(continued - expected[13:])) <= TOLERANCE
