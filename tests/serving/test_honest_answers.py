"""Invariant 9 (docs/invariants.md), honest answers: an answer never contradicts the state.

Redis is made to stall between a batch's load and its save: `CLIENT PAUSE ... WRITE` holds the save
script while reads go on, and SIGSTOP freezes the whole Redis process once the save is held. A stall
shorter than the caller's deadline costs latency, not an error; a longer one is answered "outcome
unknown", and the retry that follows is safe. Never "not applied" for a chunk that was applied.
"""

from __future__ import annotations

import signal
import threading
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from devkit.native_calls import outputs, predict, request, status_of
from devkit.processes import RedisServer, ServerProcess, wait_until
from devkit.references import TOLERANCE, keras_whole_sequence
from lstm_stream.v1 import stream_pb2 as pb
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer()  # its own: these tests pause and stop it
    yield server
    server.process.send_signal(signal.SIGCONT)
    server.stop()


@pytest.fixture(scope="module")
def server(redis: RedisServer) -> Iterator[ServerProcess]:
    # Set through the environment, so that the same test runs against servers without the option.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LSTM_SERVE_REQUEST_DEADLINE_S", "30")
        process = ServerProcess(redis.url, DEFAULT_MODEL)
    yield process
    process.stop()


def saves_held(redis: RedisServer) -> bool:
    """True once a client (the server's save script) waits behind CLIENT PAUSE."""
    return redis.client().info("clients")["blocked_clients"] >= 1


def offset(server: ServerProcess, stream: str) -> int:
    return server.stub.GetStream(pb.GetStreamRequest(stream_id=stream), timeout=10).offset


def started_stream(server: ServerProcess, length: int = 10) -> tuple[str, np.ndarray, np.ndarray]:
    stream = f"honest-{uuid.uuid4().hex[:8]}"
    x = np.random.default_rng(len(stream)).normal(size=(3 * length, 1)).astype(np.float32)
    head = outputs(predict(server.stub, stream, x[:length], start_offset=0, reset=True))
    return stream, x, head


def test_a_save_stalled_past_the_redis_socket_timeout_is_answered_ok(server, redis) -> None:
    # The old server gave up after its 2 s socket timeout (and redis-py's resends), answered UNAVAILABLE
    # "the chunk was not applied", and Redis applied the held save a moment later.
    stream, x, head = started_stream(server)
    redis.client().execute_command("CLIENT", "PAUSE", "9500", "WRITE")
    reply = predict(server.stub, stream, x[10:20], start_offset=10, timeout=30)
    assert reply.offset == 20 == offset(server, stream)
    tail = predict(server.stub, stream, x[20:], start_offset=20)
    got = np.concatenate([head, outputs(reply), outputs(tail)])
    assert np.max(np.abs(got - keras_whole_sequence(DEFAULT_MODEL, x))) <= TOLERANCE


def test_redis_stopped_between_load_and_save_costs_latency_not_an_error(server, redis) -> None:
    stream, x, head = started_stream(server)
    answer: dict[str, object] = {}

    def send() -> None:
        try:
            answer["reply"] = predict(server.stub, stream, x[10:20], start_offset=10, timeout=30)
        except grpc.RpcError as error:
            answer["error"] = error

    redis.client().execute_command("CLIENT", "PAUSE", "2000", "WRITE")
    caller = threading.Thread(target=send)
    caller.start()
    wait_until(lambda: saves_held(redis), 1.8, "the save to be held by CLIENT PAUSE")
    redis.process.send_signal(signal.SIGSTOP)  # the whole Redis freezes with the save unanswered
    try:
        threading.Event().wait(3)
    finally:
        redis.process.send_signal(signal.SIGCONT)
    caller.join(40)
    assert "error" not in answer, answer.get("error")
    assert answer["reply"].offset == 20 == offset(server, stream)
    tail = predict(server.stub, stream, x[20:], start_offset=20)
    got = np.concatenate([head, outputs(answer["reply"]), outputs(tail)])
    assert np.max(np.abs(got - keras_whole_sequence(DEFAULT_MODEL, x))) <= TOLERANCE
    assert server.process.poll() is None


def test_a_stall_past_the_deadline_is_outcome_unknown_and_the_retry_is_safe(server, redis) -> None:
    stream, x, head = started_stream(server)
    redis.client().execute_command("CLIENT", "PAUSE", "3000", "WRITE")
    code, message, metadata = status_of(server.stub.Predict, request(stream, x[10:20], start_offset=10), timeout=1.5)
    assert code == grpc.StatusCode.UNAVAILABLE, message
    assert "outcome is unknown" in message and "start_offset" in message
    assert metadata["x-chunk-outcome"] == "unknown"
    wait_until(lambda: not saves_held(redis), 10, "the pause to end")
    # Whether or not Redis ran the held save (it drops a paused command whose client went away), the retry
    # by offset is applied once: answered from the record if it ran, applied now if not.
    retry = predict(server.stub, stream, x[10:20], start_offset=10, timeout=30)
    assert retry.offset == 20 == offset(server, stream)
    tail = predict(server.stub, stream, x[20:], start_offset=20)
    got = np.concatenate([head, outputs(retry), outputs(tail)])
    assert np.max(np.abs(got - keras_whole_sequence(DEFAULT_MODEL, x))) <= TOLERANCE


def test_not_applied_means_not_applied(server, redis) -> None:
    # Reads held as well (CLIENT PAUSE ALL): the load cannot finish, nothing is written, and the answer
    # says so; the state is where it was. (A new stream: one this server just saved would start from its
    # slot in memory, and its first Redis call would be the save, held and answered "outcome unknown" as
    # in the test above.)
    stream = f"honest-{uuid.uuid4().hex[:8]}"
    x = np.random.default_rng(7).normal(size=(10, 1)).astype(np.float32)
    redis.client().execute_command("CLIENT", "PAUSE", "2500", "ALL")
    code, message, metadata = status_of(server.stub.Predict, request(stream, x, start_offset=0, reset=True),
                                        timeout=1.0)
    assert code == grpc.StatusCode.UNAVAILABLE and "not applied" in message, message
    assert metadata["x-chunk-outcome"] == "not-applied"
    wait_until(lambda: not saves_held(redis), 10, "the pause to end")
    assert not server.stub.GetStream(pb.GetStreamRequest(stream_id=stream), timeout=10).exists
    reply = predict(server.stub, stream, x, start_offset=0, reset=True)
    assert not reply.replayed and reply.offset == 10
