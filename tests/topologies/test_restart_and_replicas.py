"""Continuation across processes: a restarted server, or any replica, continues every stream exactly."""

from __future__ import annotations

import random
import uuid

import grpc
import numpy as np
import pytest

from devkit.native_calls import outputs, predict, request
from devkit.references import TOLERANCE, keras_whole_sequences
from server.config import DEFAULT_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def sequences(count: int, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    run = uuid.uuid4().hex[:6]
    return {f"rs-{run}-{n}": rng.normal(size=(length, 1)).astype(np.float32) for n in range(count)}


def assert_exact(streams: dict[str, np.ndarray], got: dict[str, list[np.ndarray]]) -> None:
    references = keras_whole_sequences(DEFAULT_MODEL, list(streams.values()))  # all in one Keras call
    for stream, expected in zip(streams, references, strict=True):
        diff = np.max(np.abs(np.concatenate(got[stream]) - expected))
        assert diff <= TOLERANCE, f"{stream}: {diff}"


def test_a_new_server_process_continues_every_stream(start_server, default_server) -> None:
    streams = sequences(12, 40, seed=1)
    got: dict[str, list[np.ndarray]] = {s: [] for s in streams}
    first = start_server()
    for stream, x in streams.items():
        got[stream].append(outputs(predict(first.stub, stream, x[:25], start_offset=0, reset=True)))
    first.stop()
    for stream, x in streams.items():  # the shared server on the same Redis: another process, started apart
        got[stream].append(outputs(predict(default_server.stub, stream, x[25:], start_offset=25)))
    assert_exact(streams, got)


def test_chunks_alternating_between_two_replicas(default_server, default_replica) -> None:
    replicas = [default_server, default_replica]
    streams = sequences(6, 60, seed=2)
    got: dict[str, list[np.ndarray]] = {s: [] for s in streams}
    # Each stream starts on a replica of a seeded choice (the same on every run), then alternates.
    rng = random.Random(2)
    first = {stream: rng.randrange(2) for stream in streams}
    for number, start in enumerate(range(0, 60, 12)):
        for stream, x in streams.items():
            replica = replicas[(number + first[stream]) % 2]
            got[stream].append(outputs(predict(replica.stub, stream, x[start : start + 12], start_offset=start)))
    assert_exact(streams, got)


def test_a_killed_replica_loses_nothing_acknowledged(start_server, default_server) -> None:
    """SIGKILL one replica while chunks are in flight; the client retries each unacknowledged chunk on
    the other replica with its start offset: it is applied once (or replayed), and every stream is exact."""
    doomed, survivor = start_server(), default_server
    streams = sequences(16, 48, seed=3)
    got: dict[str, list[np.ndarray]] = {s: [] for s in streams}
    for stream, x in streams.items():
        got[stream].append(outputs(predict(doomed.stub, stream, x[:16], start_offset=0, reset=True)))
    # Fire the second chunk of every stream at the doomed replica without waiting, then kill it.
    futures = {s: doomed.stub.Predict.future(request(s, x[16:32], start_offset=16), timeout=30)
               for s, x in streams.items()}
    doomed.kill()
    replayed = 0
    for stream, x in streams.items():
        try:
            reply = futures[stream].result()
        except grpc.RpcError:
            reply = predict(survivor.stub, stream, x[16:32], start_offset=16)  # the retry
            replayed += reply.replayed
        got[stream].append(outputs(reply))
        got[stream].append(outputs(predict(survivor.stub, stream, x[32:], start_offset=32)))
    assert_exact(streams, got)
    print(f"{replayed} retried chunks had already been applied and were replayed")
