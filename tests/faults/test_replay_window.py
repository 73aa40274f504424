"""Invariant 11 (docs/invariants.md) with a window: a PredictStream with W chunks of one stream in flight
is broken at a random instant (the answers lost on the way and the connection cut, the call cancelled,
the server SIGKILLed); a plain client then resends every unanswered chunk in order with its offset, to
the same server, to another replica, or to the killed one restarted. Every chunk is answered (the
applied ones `replayed`, with the answers kept in the slot's record: `--replay-window`), every output
equals Keras on the whole sequence, and nothing is applied twice (the offsets say so, and a chunk applied
twice would move the state and every output after it).
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import uuid
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from devkit.native_calls import outputs, request
from devkit.processes import ServerProcess, wait_until
from devkit.references import TOLERANCE, keras_whole_sequence
from devkit.tcp_proxy import TcpProxy
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc
from server.config import DEFAULT_MODEL, ServerConfig

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

CHUNKS = 24
STEPS = 4
K = ServerConfig().replay_window


def messages_of(stream: str, x: np.ndarray) -> list[pb.PredictRequest]:
    return [request(stream, x[i * STEPS:(i + 1) * STEPS], start_offset=i * STEPS) for i in range(CHUNKS)]


def offset_of(stub: stream_pb2_grpc.StreamInferenceStub, stream: str) -> int:
    return stub.GetStream(pb.GetStreamRequest(stream_id=stream), timeout=10).offset


def settled_offset(stub: stream_pb2_grpc.StreamInferenceStub, stream: str) -> int:
    """The stream's offset once a batch still running after a break has finished: the same twice, 0.5 s apart."""
    seen = [offset_of(stub, stream)]

    def same_again() -> bool:
        seen.append(offset_of(stub, stream))
        return seen[-1] == seen[-2]

    wait_until(same_again, 15, "the stream's offset to settle", interval_s=0.5)
    return seen[-1]


class Windowed:
    """A PredictStream that keeps at most `window` chunks in flight, as a pipelining client does."""

    def __init__(self, stub: stream_pb2_grpc.StreamInferenceStub, messages: list[pb.PredictRequest],
                 window: int) -> None:
        self.answers: list[pb.PredictResponse] = []
        self.sent = 0
        self._room = threading.Semaphore(window)
        self._stop = threading.Event()
        self._messages = messages
        self.call = stub.PredictStream(self._requests(), timeout=120)

    def _requests(self) -> Iterator[pb.PredictRequest]:
        for message in self._messages:
            while not self._room.acquire(timeout=0.05):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            self.sent += 1
            yield message
        self._stop.wait(120)  # the client's side stays open: only the break ends the call

    def read_until(self, answers: int, on_break: Callable[[], None]) -> None:
        """Read answers; once `answers` have arrived, break the call with `on_break` and stop."""
        try:
            for reply in self.call:
                assert not reply.HasField("error"), reply.error.message
                self.answers.append(reply)
                self._room.release()
                if len(self.answers) == answers:
                    on_break()
                    return
        except grpc.RpcError:
            pass  # the break
        finally:
            self._stop.set()


def resume(stub: stream_pb2_grpc.StreamInferenceStub, messages: list[pb.PredictRequest],
           answered: int) -> list[pb.PredictResponse]:
    """A plain client's resume: every unanswered chunk again, in order, with its offset."""
    replies = list(stub.PredictStream(iter(messages[answered:]), timeout=120))
    for reply in replies:
        assert not reply.HasField("error"), reply.error.message
    return replies


def check(stream: str, x: np.ndarray, answered: list[pb.PredictResponse], resumed: list[pb.PredictResponse],
          applied_unanswered: int, stub: stream_pb2_grpc.StreamInferenceStub) -> None:
    """`applied_unanswered`: how many chunks were applied with their answers lost (-n: at most n, the
    chunks in flight when a cancel caught them, each applied or not)."""
    assert len(answered) + len(resumed) == CHUNKS
    # The chunks applied before the break whose answers were lost replay; the rest are applied now.
    replays = sum(r.replayed for r in resumed)
    assert replays == applied_unanswered or (applied_unanswered < 0 and replays <= -applied_unanswered)
    assert [r.replayed for r in resumed] == [i < replays for i in range(len(resumed))]
    assert [r.offset for r in answered + resumed] == [(i + 1) * STEPS for i in range(CHUNKS)]
    got = np.concatenate([outputs(r) for r in answered + resumed])
    assert np.max(np.abs(got - keras_whole_sequence(DEFAULT_MODEL, x))) <= TOLERANCE
    assert offset_of(stub, stream) == CHUNKS * STEPS


@pytest.fixture
def replicas(default_server: ServerProcess, default_replica: ServerProcess) -> tuple[ServerProcess, ServerProcess]:
    """Two replicas on one Redis, as behind a load balancer: the session's shared pair (each test uses its
    own streams and leaves the servers as it found them)."""
    return default_server, default_replica


@pytest.mark.parametrize("window", [2, K])
def test_answers_lost_on_a_cut_connection_are_replayed_after_it(replicas, window: int) -> None:
    server, _ = replicas
    rng = random.Random(window)
    proxy = TcpProxy(server.port)
    try:
        for trial in range(3):
            stream = f"cut-{window}-{trial}-{uuid.uuid4().hex[:6]}"
            x = np.random.default_rng(trial).normal(size=(CHUNKS * STEPS, 1)).astype(np.float32)
            messages = messages_of(stream, x)
            answered_before = rng.randrange(1, CHUNKS - window)
            channel = grpc.insecure_channel(proxy.address)
            client = Windowed(stream_pb2_grpc.StreamInferenceStub(channel), messages, window)

            def cut() -> None:
                # The answers of the chunks now in flight are lost on the way, then the connection is cut.
                proxy.hold_answers()
                wait_until(lambda: client.sent == answered_before + window, 30, "a full window")  # noqa: B023
                wait_until(lambda: offset_of(server.stub, stream) == client.sent * STEPS, 30,  # noqa: B023
                           "the chunks in flight to be applied")
                proxy.sever()

            client.read_until(answered_before, cut)
            channel.close()
            assert len(client.answers) == answered_before
            resumed = resume(server.stub, messages, answered_before)
            check(stream, x, client.answers, resumed, window, server.stub)
    finally:
        proxy.close()


@pytest.mark.parametrize("window", [2, K])
def test_a_cancelled_call_resumes_on_another_replica_with_every_output(replicas, window: int) -> None:
    first, other = replicas
    rng = random.Random(100 + window)
    for trial in range(3):
        stream = f"cancel-{window}-{trial}-{uuid.uuid4().hex[:6]}"
        x = np.random.default_rng(10 + trial).normal(size=(CHUNKS * STEPS, 1)).astype(np.float32)
        messages = messages_of(stream, x)
        answered_before = rng.randrange(1, CHUNKS - window)
        client = Windowed(first.stub, messages, window)
        client.read_until(answered_before, lambda: client.call.cancel())  # noqa: B023
        # Whatever the cancel caught in flight was applied once or not at all: those replay, the rest run.
        resumed = resume(other.stub, messages, len(client.answers))
        check(stream, x, client.answers, resumed, -(client.sent - len(client.answers)), other.stub)


def test_a_killed_replica_s_chunks_are_answered_by_another_and_by_itself_restarted(start_server,
                                                                                   default_server) -> None:
    # The victim is its own (it is killed); the other replica, on the same Redis, is the session's shared one.
    victim, other = start_server(), default_server
    stream = f"killed-{uuid.uuid4().hex[:6]}"
    x = np.random.default_rng(20).normal(size=(CHUNKS * STEPS, 1)).astype(np.float32)
    messages = messages_of(stream, x)
    client = Windowed(victim.stub, messages, K)
    client.read_until(5, lambda: victim.stop(signal.SIGKILL))
    applied = settled_offset(other.stub, stream) // STEPS
    assert len(client.answers) <= applied <= client.sent
    # The other replica answers the unanswered chunks up to the middle of the sequence ...
    middle = CHUNKS // 2
    got = list(client.answers)
    with contextlib.closing(grpc.insecure_channel(other.address)) as channel:
        stub = stream_pb2_grpc.StreamInferenceStub(channel)
        got += list(stub.PredictStream(iter(messages[len(got):middle]), timeout=120))
    assert all(not r.HasField("error") for r in got)
    assert [r.replayed for r in got[len(client.answers):]] == \
        [i < applied for i in range(len(client.answers), middle)]
    # ... and the killed one, restarted, the rest (its own retries of the middle chunks replay there too).
    restarted = start_server(port=victim.port)
    again = list(restarted.stub.PredictStream(iter(messages[middle - 2:]), timeout=120))
    assert [r.replayed for r in again[:2]] == [True, True] and not any(r.replayed for r in again[2:])
    assert [outputs(a).tolist() for a in again[:2]] == [outputs(g).tolist() for g in got[middle - 2:middle]]
    every = got + again[2:]
    assert [r.offset for r in every] == [(i + 1) * STEPS for i in range(CHUNKS)]
    assert np.max(np.abs(np.concatenate([outputs(r) for r in every]) - keras_whole_sequence(DEFAULT_MODEL, x))) \
        <= TOLERANCE
