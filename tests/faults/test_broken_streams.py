"""Invariant 11 (docs/invariants.md), resume after a break: when a PredictStream (or Triton's
ModelStreamInfer) breaks, chunks of it not yet started are dropped (never run later), a chunk in a
running batch finishes, so the stream's offset stops at a chunk boundary; retrying every chunk in
order with its offset gives every output.

The break is made deterministic by pausing Redis (SIGSTOP) so the stream's first chunk holds its batch
while the rest wait in the batcher's queue; the call is cancelled there, then Redis continues.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import urllib.request
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devkit.native_calls import outputs, request
from devkit.peers import triton_messages
from devkit.processes import NO_WARMUP, RedisServer, ServerProcess, wait_until
from devkit.references import TOLERANCE, keras_whole_sequence
from lstm_stream.v1 import stream_pb2 as pb
from server.config import DEFAULT_MODEL, ServerConfig

triton_pb2, triton_pb2_grpc = triton_messages()
pytestmark = pytest.mark.timeout(180)

CHUNKS = 24
STEPS = 8


@pytest.fixture(scope="module")
def paused_redis() -> Iterator[RedisServer]:
    server = RedisServer()  # its own: the test stops and continues it
    yield server
    if server.process and server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


@pytest.fixture(scope="module")
def paused_server(paused_redis: RedisServer) -> Iterator[ServerProcess]:
    """A server on paused_redis, shared by both protocols' tests: each reads the metrics as differences and
    leaves the batcher idle."""
    server = ServerProcess(paused_redis.url, DEFAULT_MODEL, *NO_WARMUP)
    yield server
    server.stop()


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


class Native:
    """The native PredictStream."""

    def __init__(self, server: ServerProcess) -> None:
        self.call = server.stub.PredictStream

    @staticmethod
    def message(stream: str, x: np.ndarray, start: int) -> pb.PredictRequest:
        return request(stream, x, start_offset=start)

    @staticmethod
    def reply(reply: pb.PredictResponse) -> tuple[str, bool, np.ndarray]:
        return reply.error.message if reply.HasField("error") else "", reply.replayed, outputs(reply)


class Triton:
    """Triton's ModelStreamInfer (messages from devkit.peers.triton_messages())."""

    def __init__(self, server: ServerProcess) -> None:
        self.channel = grpc.insecure_channel(server.address)
        self.call = triton_pb2_grpc.GRPCInferenceServiceStub(self.channel).ModelStreamInfer

    @staticmethod
    def message(stream: str, x: np.ndarray, start: int) -> triton_pb2.ModelInferRequest:
        message = triton_pb2.ModelInferRequest(model_name="default", raw_input_contents=[x.astype("<f4").tobytes()])
        message.inputs.add(name="INPUT", datatype="FP32", shape=list(x.shape))
        message.parameters["sequence_id"].string_param = stream
        message.parameters["start_offset"].int64_param = start
        message.parameters["sequence_start"].bool_param = start == 0
        return message

    @staticmethod
    def reply(reply: triton_pb2.ModelStreamInferResponse) -> tuple[str, bool, np.ndarray]:
        response = reply.infer_response
        replayed = "replayed" in response.parameters and response.parameters["replayed"].bool_param
        values = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(-1, 1) if not reply.error_message \
            else np.zeros((0, 1), np.float32)
        return reply.error_message, replayed, values


@pytest.mark.parametrize("protocol", [Native, Triton], ids=["native", "triton"])
def test_a_broken_stream_drops_its_queued_chunks_and_resumes_exactly(paused_server, paused_redis, protocol) -> None:
    server = paused_server
    stub = server.stub
    api = protocol(server)
    stream = f"broken-{uuid.uuid4().hex[:8]}"
    x = np.random.default_rng(31).normal(size=(CHUNKS * STEPS, 1)).astype(np.float32)
    messages = [api.message(stream, x[i * STEPS:(i + 1) * STEPS], i * STEPS) for i in range(CHUNKS)]
    dropped_before = metric(server, "lstm_serve_chunks_total", outcome="dropped")
    batches_before = metric(server, "lstm_serve_batch_seconds_count")
    hold_open = threading.Event()

    def send() -> Iterator[object]:
        yield from messages
        hold_open.wait(60)  # the client keeps its side open: the call breaks only by the cancel below

    # Redis stays paused for well under the chunk's deadline (10 s), so the held batch succeeds.
    os.kill(paused_redis.process.pid, signal.SIGSTOP)
    try:
        call = api.call(send(), timeout=60)
        # Chunk 0 holds a batch (its load waits on Redis); the other chunks of the stream wait behind it.
        wait_until(lambda: metric(server, "lstm_serve_in_flight_chunks") >= 1, 5, "chunk 0 to hold a batch")
        with contextlib.suppress(TimeoutError):  # bounded: on a slow machine fewer may be queued
            wait_until(lambda: metric(server, "lstm_serve_queued_chunks") >= CHUNKS - 1, 0.6, "chunks queued")
        queued = metric(server, "lstm_serve_queued_chunks")
        call.cancel()
        with contextlib.suppress(TimeoutError):  # the server drops them as soon as it sees the break
            wait_until(lambda: metric(server, "lstm_serve_chunks_total", outcome="dropped") - dropped_before
                       >= queued, 0.6, "queued chunks dropped")
    finally:
        hold_open.set()
        os.kill(paused_redis.process.pid, signal.SIGCONT)

    # The held batch (chunk 0 alone) finishes; nothing else of the stream may run after it.
    wait_until(lambda: metric(server, "lstm_serve_batch_seconds_count") > batches_before, 30, "the held batch")
    wait_until(lambda: metric(server, "lstm_serve_queued_chunks") == 0, 30, "an idle batcher")
    offset = stub.GetStream(pb.GetStreamRequest(stream_id=stream), timeout=30).offset
    assert offset in (0, STEPS), f"chunks queued behind the break ran later: offset {offset}"
    assert metric(server, "lstm_serve_chunks_total", outcome="dropped") - dropped_before >= queued

    # The client reconnects and retries every chunk in order with its offset: the last applied chunk
    # replays, earlier ones would be refused with the current offset, the rest are applied.
    got = []
    for index, reply in enumerate(api.call(iter(messages), timeout=60)):
        error, replayed, values = api.reply(reply)
        assert not error, error
        assert replayed == (index * STEPS + STEPS == offset)
        got.append(values)
    expected = keras_whole_sequence(DEFAULT_MODEL, x)
    assert np.max(np.abs(np.concatenate(got) - expected)) <= TOLERANCE
    assert stub.GetStream(pb.GetStreamRequest(stream_id=stream), timeout=30).offset == CHUNKS * STEPS


def test_unanswered_applied_chunks_replay_inside_the_window_and_older_ones_are_refused(start_server,
                                                                                     default_server) -> None:
    """What docs/api.md ("Resume after a break") tells a reconnecting client: the applied chunks among the
    last --replay-window replay with their answers; an older one is refused FAILED_PRECONDITION as no longer
    kept, with the offset in `x-stream-offset` (skip it: its end is at or before that offset), and is
    never applied again."""
    default_window = ServerConfig().replay_window
    for window in (default_window, 2):  # the default (8) on the session's shared server
        stub = (default_server if window == default_window else start_server("--replay-window", str(window))).stub
        stream = f"resume-{uuid.uuid4().hex[:8]}"
        x = np.random.default_rng(32).normal(size=(4 * STEPS, 1)).astype(np.float32)
        messages = [request(stream, x[i * STEPS:(i + 1) * STEPS], start_offset=i * STEPS) for i in range(4)]
        for message in messages[:3]:  # applied, but (as after a break) the client never read the answers
            stub.Predict(message, timeout=30)
        replies = list(stub.PredictStream(iter(messages), timeout=60))
        refused = 3 - min(window, 3)  # the applied chunks older than the window
        assert [r.error.code for r in replies[:refused]] == [grpc.StatusCode.FAILED_PRECONDITION.value[0]] * refused
        assert all("no longer kept" in r.error.message and r.offset == 3 * STEPS for r in replies[:refused])
        assert [r.replayed for r in replies[refused:]] == [True] * (3 - refused) + [False]
        assert replies[3].offset == 4 * STEPS
        got = np.concatenate([outputs(r) for r in replies[refused:]])
        assert np.max(np.abs(got - keras_whole_sequence(DEFAULT_MODEL, x)[refused * STEPS:])) <= TOLERANCE
