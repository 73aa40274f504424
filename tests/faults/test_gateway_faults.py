"""A gateway's exactly-once through broken connections, with the client library and no retry code here.

Invariants 11 and 17 (docs/invariants.md) as a gateway sees them: a PredictBatchStream cut by a TCP proxy
while a full window of messages was applied but unanswered is reopened by the client, the unanswered
messages resent with the same offsets and request ids, and every stream's every output arrives exactly once,
equal to Keras; and a unary PredictBatch whose answer is lost with the connection is resent, answered
`replayed`. The server's offsets show nothing was applied twice.
"""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest

from devkit.processes import wait_until
from devkit.references import TOLERANCE, keras_whole_sequences
from devkit.tcp_proxy import TcpProxy
from lstm_stream.client import Client
from lstm_stream.v1 import stream_pb2 as pb
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(120)
STREAMS = 6
CHUNK = 4
TICKS = 20
WINDOW = 8  # the server's default --replay-window


def server_offsets(server, stream_ids: list[str]) -> list[int]:  # type: ignore[no-untyped-def]
    """Asked of the server directly, past the proxy."""
    return [server.stub.GetStream(pb.GetStreamRequest(stream_id=s), timeout=5).offset for s in stream_ids]


def assert_keras(signals: dict[str, np.ndarray], got: dict[str, np.ndarray], what: str) -> None:
    expected = keras_whole_sequences(DEFAULT_MODEL, list(signals.values()))
    for stream_id, want in zip(signals, expected, strict=True):
        assert got[stream_id].shape == want.shape, f"{what}: {stream_id}"
        diff = float(np.max(np.abs(got[stream_id] - want)))
        assert diff <= TOLERANCE, f"{what}: {stream_id}: max abs diff {diff}"


def test_a_cut_predict_batch_stream_resumes_exactly(default_server) -> None:
    """Ticks 0-3 answered; then the proxy drops the server's answers while it applies ticks 4-11 (a full
    window of 8 messages), and cuts the connection: the client resends the 8 (answered `replayed`) and the
    rest. Every tick's result once, in order, every output equal to Keras, the offsets exactly the lengths."""
    proxy = TcpProxy(default_server.port)
    tag = uuid.uuid4().hex[:6]
    rng = np.random.default_rng(21)
    signals = {f"gwf-{tag}-{n}": rng.normal(size=(TICKS * CHUNK, 1)).astype(np.float32) for n in range(STREAMS)}
    ids = list(signals)
    answered, applied = 4, 12
    try:
        with Client(proxy.address, deadline=60, attempt_timeout=20) as client:
            gateway = client.gateway()

            def cut_once_applied() -> None:
                wait_until(lambda: server_offsets(default_server, ids) == [applied * CHUNK] * STREAMS, 30,
                           f"ticks {answered}-{applied - 1} applied")
                proxy.sever()

            def ticks():  # type: ignore[no-untyped-def]
                for number in range(TICKS):
                    if number == answered:
                        wait_until(lambda: [gateway.offset(s) for s in ids] == [answered * CHUNK] * STREAMS, 30,
                                   f"ticks 0-{answered - 1} answered")
                        proxy.hold_answers()  # from here the answers are lost on the way
                    if number == applied - 1:
                        threading.Thread(target=cut_once_applied, daemon=True).start()
                    yield {s: x[number * CHUNK:(number + 1) * CHUNK] for s, x in signals.items()}

            results = list(gateway.pipe(ticks(), window=WINDOW))
            assert [gateway.offset(s) for s in ids] == [TICKS * CHUNK] * STREAMS
        assert proxy.connections >= 2, "the proxy saw the reconnection"
        assert len(results) == TICKS and all(r.ok for r in results), [r.errors for r in results if not r.ok]
        got = {s: np.concatenate([r[s] for r in results]) for s in ids}
        assert_keras(signals, got, "a cut PredictBatchStream")
        assert server_offsets(default_server, ids) == [TICKS * CHUNK] * STREAMS  # nothing applied twice
    finally:
        proxy.close()


def test_a_lost_unary_answer_is_resent_and_replayed(default_server) -> None:
    """A tick's PredictBatch is applied but its answer dropped, then the connection cut: `send` resends the
    same message, the server answers it `replayed`, and the next tick continues exactly."""
    proxy = TcpProxy(default_server.port)
    tag = uuid.uuid4().hex[:6]
    rng = np.random.default_rng(22)
    signals = {f"gwu-{tag}-{n}": rng.normal(size=(3 * CHUNK, 1)).astype(np.float32) for n in range(STREAMS)}
    ids = list(signals)
    try:
        with Client(proxy.address, deadline=60, attempt_timeout=20) as client:
            gateway = client.gateway()
            tick = [{s: x[n * CHUNK:(n + 1) * CHUNK] for s, x in signals.items()} for n in range(3)]
            first = gateway.send(tick[0]).raise_for_errors()
            proxy.hold_answers()

            def cut_once_applied() -> None:
                wait_until(lambda: server_offsets(default_server, ids) == [2 * CHUNK] * STREAMS, 30, "tick 1 applied")
                proxy.sever()

            cutter = threading.Thread(target=cut_once_applied, daemon=True)
            cutter.start()
            second = gateway.send(tick[1]).raise_for_errors()
            cutter.join(30)
            third = gateway.send(tick[2]).raise_for_errors()
        assert proxy.connections >= 2
        got = {s: np.concatenate([first[s], second[s], third[s]]) for s in ids}
        assert_keras(signals, got, "a lost PredictBatch answer")
        assert server_offsets(default_server, ids) == [3 * CHUNK] * STREAMS
    finally:
        proxy.close()

