"""Invariants 12 and 17 (docs/invariants.md) for many-chunk messages: a gateway that sends the largest messages
the server accepts and never reads its answers holds a bounded budget of the server's memory (the stream window
counts a PredictBatchStream's messages and bytes), a message past the size limit is refused RESOURCE_EXHAUSTED,
and a normal client keeps being served meanwhile.

Memory is read from /proc/PID/status (VmRSS) with a generous bound, never from timings.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from devkit.native_calls import predict, status_of
from lstm_stream.v1 import stream_pb2 as pb

pytestmark = pytest.mark.timeout(180)


def batch_message(chunks: int, timesteps: int, bad: bool) -> pb.PredictBatchRequest:
    """`chunks` chunks of `timesteps` timesteps in one block; `bad`: each carries a NaN (refused, nothing
    applied), so the abuse costs the server reading and answering, never Redis."""
    values = np.ones(chunks * timesteps, np.float32)
    if bad:
        values[::timesteps] = np.nan
    return pb.PredictBatchRequest(
        chunks=[pb.PredictRequest(stream_id=f"abuse-{i}", timesteps=timesteps, start_offset=0) for i in range(chunks)],
        values=values.astype("<f4").tobytes())


def test_a_non_reading_gateway_cannot_grow_server_memory(start_server) -> None:
    server = start_server()
    stub = server.stub
    model = stub.GetModel(pb.GetModelRequest(), timeout=30)
    # The largest message the limits allow: every chunk, every timestep (about 0.9 MiB on the default model).
    largest = batch_message(model.max_batch_chunks, model.max_batch_timesteps // model.max_batch_chunks, bad=True)
    # Twice its timesteps: refused by the message's timestep limit; 4 MiB of values: by gRPC's size limit.
    too_long = batch_message(model.max_batch_chunks, 2 * model.max_batch_timesteps // model.max_batch_chunks, bad=True)
    code, message, _ = status_of(stub.PredictBatch, too_long, timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "--max-batch-timesteps" in message, message
    code, message, _ = status_of(stub.PredictBatch, batch_message(1024, 1024, bad=True), timeout=30)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in message, message
    normal = f"normal-{uuid.uuid4().hex[:6]}"
    x = np.ones((20, 1), np.float32)
    assert predict(stub, normal, x, start_offset=0).offset == 20
    before = server.rss_mib()
    stop = threading.Event()
    ended: list[str] = []

    def abuse() -> None:
        with grpc.insecure_channel(server.address) as channel:
            gateway = channel.stream_stream(
                "/lstm_stream.v1.StreamInference/PredictBatchStream",
                request_serializer=pb.PredictBatchRequest.SerializeToString,
                response_deserializer=pb.PredictBatchResponse.FromString,
            )

            def send() -> Iterator[pb.PredictBatchRequest]:
                for _ in range(200):  # 180 MiB offered on each connection
                    if stop.is_set():
                        return
                    yield largest
                stop.wait(60)

            call = gateway(send(), timeout=120)  # answers are never read
            stop.wait(60)
            call.cancel()
            ended.append(str(call.code()))

    abusers = [threading.Thread(target=abuse, daemon=True) for _ in range(3)]
    for thread in abusers:
        thread.start()
    try:
        served = 0
        # The normal client keeps streaming while the abuse runs: for 8 s, and at least 3 calls, each answered within
        # its own timeout however slow the machine (a count within a fixed time would be a speed test).
        abuse_began = time.monotonic()
        while served < 3 or time.monotonic() < abuse_began + 8:
            served += 1
            assert predict(stub, normal, x, start_offset=20 * served, timeout=30).offset == 20 * (served + 1)
        assert not ended, f"an abuser's stream ended before the normal client was served: {ended}"
        during = server.rss_mib()
    finally:
        stop.set()
        for thread in abusers:
            thread.join(30)
    after = server.rss_mib()
    print(f"server RSS: before {before:.0f} MiB, during abuse {during:.0f} MiB, after {after:.0f} MiB; "
          f"{served} normal calls answered; abusers ended {ended}")
    # Generous: each connection holds at most its stream window (1 MiB of requests, their answers) plus gRPC's
    # buffers; 540 MiB offered in all.
    assert during - before < 300 and after - before < 300, (before, during, after)
    assert server.process.poll() is None
