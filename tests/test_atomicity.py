"""Invariant 5: one compare-and-set per chunk; two replicas never both apply a chunk on the same base.

See docs/invariants.md.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from lstm_stream.client.types import OFFSET_METADATA_KEY
from lstm_stream.v1 import stream_pb2 as pb
from tests.client import outputs, predict, request
from tests.models import TOLERANCE, keras_whole_sequence
from tests.support import DEFAULT_MODEL

ROUNDS = 12


@pytest.mark.timeout(240)
def test_racing_replicas_apply_exactly_one_chunk(start_server) -> None:
    replicas = [start_server(), start_server()]
    rng = np.random.default_rng(4)
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
            expected = keras_whole_sequence(DEFAULT_MODEL, np.concatenate([head, x, tail]))
            assert np.max(np.abs(outputs(reply) - expected[5:13])) <= TOLERANCE
            assert np.max(np.abs(outputs(last) - expected[13:])) <= TOLERANCE
