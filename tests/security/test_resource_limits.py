"""Invariant 12 (docs/invariants.md), bounded resources: no client, connection or burst makes the
server hold unbounded memory or queue; past a limit the call gets RESOURCE_EXHAUSTED with a message
saying which limit, and everyone else keeps being served.

Memory is read from /proc/PID/status (VmRSS) with a generous bound, never from timings.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from devkit.metrics import scrape, value
from devkit.native_calls import predict, request, status_of
from devkit.processes import RedisServer, ServerProcess, wait_until
from lstm_stream.v1 import stream_pb2 as pb

pytestmark = pytest.mark.timeout(240)

CALL_TIMEOUT_S = 30
MiB = 1024 * 1024


@pytest.fixture
def paused_redis() -> Iterator[RedisServer]:
    server = RedisServer(appendonly=False)  # its own: the tests stop and continue it
    yield server
    if server.process and server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


def test_an_oversized_message_is_refused_and_the_server_keeps_serving(default_server) -> None:
    stub = default_server.stub
    # 1,024 timesteps x 1 feature is the largest valid chunk (4 KiB of floats); 1 MiB is far beyond it.
    huge = pb.PredictRequest(stream_id="huge", values=np.zeros(256 * 1024, np.float32), timesteps=1024)
    code, message, _ = status_of(stub.Predict, huge, timeout=CALL_TIMEOUT_S)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in message, message
    # The largest valid chunk still fits, with its id and request id at their longest.
    x = np.random.default_rng(3).normal(size=(1024, 1)).astype(np.float32)
    stream = "é" * 120 + uuid.uuid4().hex[:16]
    reply = predict(stub, stream, x, start_offset=0, request_id="r" * 256)
    assert reply.offset == 1024


def test_queue_and_call_limits_answer_resource_exhausted(start_server, paused_redis) -> None:
    # A long deadline: the held chunks wait on a stopped Redis while the test fills the queue. One batch slot:
    # the first batch holds it, so every later chunk queues (a second slot would start a second batch).
    server = start_server("--max-queued-chunks", "2", "--max-concurrent-rpcs", "6", "--request-deadline-s", "50",
                          "--max-in-flight", "1", redis_url=paused_redis.url)
    stub = server.stub
    tag = uuid.uuid4().hex[:6]
    x = np.ones((2, 1), np.float32)
    hold_open = threading.Event()

    def one_chunk(stream: str) -> Iterator[pb.PredictRequest]:
        yield request(stream, x, start_offset=0)
        hold_open.wait(60)

    def open_stream(i: int, held: tuple[float, float]) -> grpc.Future:
        # One at a time, each seen held by the batcher before the next: streams' chunks race otherwise,
        # and which ones are refused (or how many share the first batch) would be chance.
        call = stub.PredictStream(one_chunk(f"limits-{tag}-{i}"), timeout=60)
        wait_until(lambda: batcher_holds(server) == held, 20, f"the batcher to hold (in flight, queued) {held}")
        return call

    os.kill(paused_redis.process.pid, signal.SIGSTOP)  # the first batch waits on Redis; the rest queue
    try:
        calls = [open_stream(0, (1, 0)), open_stream(1, (1, 1)), open_stream(2, (1, 2))]
        # 1 chunk in the held batch + 2 queued: the other streams' chunks are refused at once.
        calls += [stub.PredictStream(one_chunk(f"limits-{tag}-{i}"), timeout=60) for i in range(3, 6)]
        for reply in [next(call) for call in calls[3:]]:
            assert reply.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], reply
            assert "--max-queued-chunks" in reply.error.message and "not applied" in reply.error.message
        assert batcher_holds(server) == (1, 2)
        # Six streams are open: a seventh call is refused by the call limit, not queued.
        code, message, _ = status_of(stub.GetModel, pb.GetModelRequest(), timeout=CALL_TIMEOUT_S)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
    finally:
        os.kill(paused_redis.process.pid, signal.SIGCONT)
    answered = [next(call) for call in calls[:3]]
    assert all(not reply.HasField("error") and reply.offset == 2 for reply in answered), answered
    hold_open.set()
    for call in calls:
        call.cancel()
    # Everyone else keeps being served once the burst is gone.
    wait_until(lambda: _serves(stub), 20, "the server to answer again")
    assert predict(stub, f"limits-{tag}-3", x, start_offset=0).offset == 2  # the refused chunk: not applied


def batcher_holds(server: ServerProcess) -> tuple[float, float]:
    """(chunks in running batches, chunks queued), from the server's /metrics."""
    samples = scrape(server)
    return value(samples, "lstm_serve_in_flight_chunks"), value(samples, "lstm_serve_queued_chunks")


def _serves(stub) -> bool:
    try:
        return stub.GetModel(pb.GetModelRequest(), timeout=5).input_features == 1
    except grpc.RpcError:
        return False


def test_a_non_reading_abuser_cannot_grow_server_memory(start_server) -> None:
    """A PredictStream client that never reads its answers and keeps sending large invalid requests
    (the issue's abuse: 7.6 MiB each grew the server from 584 to 1,300 MiB) while a normal client works."""
    server = start_server()
    stub = server.stub
    normal = f"normal-{uuid.uuid4().hex[:6]}"
    x = np.ones((20, 1), np.float32)
    assert predict(stub, normal, x, start_offset=0).offset == 20
    before = server.rss_mib()

    big = pb.PredictRequest(stream_id="abuse", values=np.ones(4 * MiB, np.float32), timesteps=1)  # 16 MiB
    near_limit = pb.PredictRequest(stream_id="abuse", values=np.ones(15_000, np.float32), timesteps=1)  # 60 KB
    stop = threading.Event()
    outcomes: dict[str, int] = {}

    def abuse(message: pb.PredictRequest, count: int) -> None:
        with grpc.insecure_channel(server.address) as channel:
            abuser = channel.stream_stream(
                "/lstm_stream.v1.StreamInference/PredictStream",
                request_serializer=pb.PredictRequest.SerializeToString,
                response_deserializer=pb.PredictResponse.FromString,
            )
            while not stop.is_set():
                def send() -> Iterator[pb.PredictRequest]:
                    for _ in range(count):
                        if stop.is_set():
                            return
                        yield message
                    stop.wait(60)
                call = abuser(send(), timeout=120)  # answers are never read
                while not call.done() and not stop.wait(0.05):
                    pass
                code = call.code() if call.done() else "open at the end"
                call.cancel()
                outcomes[str(code)] = outcomes.get(str(code), 0) + 1

    abusers = [threading.Thread(target=abuse, args=(big, 30), daemon=True) for _ in range(3)]
    abusers += [threading.Thread(target=abuse, args=(near_limit, 2000), daemon=True) for _ in range(2)]
    for thread in abusers:
        thread.start()
    try:
        served = 0
        deadline = time.monotonic() + 12  # the abuse runs while the normal client keeps streaming
        while time.monotonic() < deadline:
            served += 1
            reply = predict(stub, normal, x, start_offset=20 * served, timeout=CALL_TIMEOUT_S)
            assert reply.offset == 20 * (served + 1)
        during = server.rss_mib()
    finally:
        stop.set()
        for thread in abusers:
            thread.join(30)
    after = server.rss_mib()
    print(f"server RSS: before {before:.0f} MiB, during abuse {during:.0f} MiB, after {after:.0f} MiB; "
          f"{served} normal calls answered; abuser calls ended {outcomes}")
    assert served >= 3
    # Generous: 40-140 MiB of growth measured with the limits (allocator arenas, gRPC buffers, the normal
    # client's work); 1,200 MiB without them.
    assert during - before < 300 and after - before < 300, (before, during, after)
    assert server.process.poll() is None
