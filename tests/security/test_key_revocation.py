"""A key taken away by a reload of the key file ends the calls already open with it (invariant 13,
docs/invariants.md; docs/security.md, "API keys and tenants").

One server with a key file; streams of both protocols are opened, each applies a chunk, then the file is
rewritten and SIGHUP sent. After the reload (a new call with the revoked key is refused), each open stream
sends its next chunk:
- a revoked key's streams (native PredictStream and Triton ModelStreamInfer) end UNAUTHENTICATED, and that
  chunk is not applied: the tenant's other, still valid key reads the stream's offset unchanged;
- a key moved to another tenant: its streams end the same way; neither the old tenant's stream advances
  nor does the new tenant get one;
- a key the reload left alone keeps its streams working across it.

Triton messages come from `devkit.peers.triton_messages()` (tritonclient's copy, or the server's own when
this process already loaded it: the two cannot share a process).
"""

from __future__ import annotations

import queue
import secrets
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from devkit.native_calls import request
from devkit.peers import triton_messages
from devkit.processes import RedisServer, ServerProcess, wait_until
from lstm_stream.v1 import stream_pb2 as pb
from server.config import DEFAULT_MODEL
from tests.security.test_security import code_of, new_id, sequence

triton_pb2, triton_pb2_grpc = triton_messages()
pytestmark = pytest.mark.timeout(180)

TIMEOUT_S = 60
STEPS = 5
# Two keys for each tenant whose key is taken away, so the other can still read its streams afterwards.
KEYS = {name: f"{name}-{secrets.token_hex(16)}"
        for name in ("gamma", "gamma-spare", "delta", "delta-spare", "epsilon", "alpha")}


def bearer(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[name]}"),)


def key_file(*, reloaded: bool) -> str:
    """Before: every key as named. After: gamma's first key removed, delta's first key moved to epsilon."""
    lines = [f"alpha {KEYS['alpha']}", f"gamma {KEYS['gamma-spare']}", f"delta {KEYS['delta-spare']}",
             f"epsilon {KEYS['epsilon']}"]
    lines += [f"epsilon {KEYS['delta']}"] if reloaded else [f"gamma {KEYS['gamma']}", f"delta {KEYS['delta']}"]
    return "\n".join(lines) + "\n"


class OpenCall:
    """A bidirectional call driven one request at a time: send one, read its answer or the call's end."""

    def __init__(self, method, metadata: tuple[tuple[str, str], ...]) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._responses = method(iter(self._requests.get, None), metadata=metadata, timeout=TIMEOUT_S)

    def ask(self, message: object) -> object:
        self._requests.put(message)
        return next(self._responses)

    def ended_with(self, message: object) -> tuple[grpc.StatusCode, str]:
        """Send `message`; the call must end instead of answering it."""
        try:
            answer = self.ask(message)
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
        raise AssertionError(f"the call answered instead of ending: {answer}")

    def close(self) -> None:
        self._requests.put(None)
        self._responses.cancel()


def native_chunk(stream: str, x: np.ndarray, start: int) -> pb.PredictRequest:
    return request(stream, x, start_offset=start, reset=start == 0)


def triton_chunk(stream: str, x: np.ndarray, start: int) -> object:
    message = triton_pb2.ModelInferRequest(model_name="default", raw_input_contents=[x.astype("<f4").tobytes()])
    message.inputs.add(name="INPUT", datatype="FP32", shape=list(x.shape))
    message.parameters["sequence_id"].string_param = stream  # a string sequence id is the stream id
    message.parameters["start_offset"].int64_param = start
    message.parameters["sequence_start"].bool_param = start == 0
    return message


def native_offset(answer: pb.PredictResponse) -> int:
    assert not answer.HasField("error"), answer.error
    return answer.offset


def triton_offset(answer) -> int:
    assert not answer.error_message, answer.error_message
    return answer.infer_response.parameters["sequence_offset"].int64_param


PROTOCOLS = {  # name: (the call on a server, a chunk, the offset its answer reports)
    "native": (lambda server: server.stub.PredictStream, native_chunk, native_offset),
    "triton": (lambda server: triton_pb2_grpc.GRPCInferenceServiceStub(server.channel).ModelStreamInfer,
               triton_chunk, triton_offset),
}


@pytest.fixture(scope="module")
def keyed_server(redis_server: RedisServer) -> Iterator[tuple[ServerProcess, Path]]:
    keys = Path(tempfile.mkdtemp(prefix="lstm-revoke-")) / "api-keys"
    keys.write_text(key_file(reloaded=False))
    server = ServerProcess(redis_server.url, DEFAULT_MODEL, "--api-keys", str(keys))
    yield server, keys
    server.stop()


def test_a_reload_ends_the_open_calls_of_revoked_and_moved_keys_only(keyed_server) -> None:
    server, keys = keyed_server
    x = sequence(7, 2 * STEPS)
    opened: dict[tuple[str, str], tuple[OpenCall, str]] = {}  # (protocol, key name) -> (call, stream id)
    try:
        for protocol, (method, chunk, offset) in PROTOCOLS.items():
            for name in ("gamma", "delta", "alpha"):
                stream = new_id(f"{protocol}-{name}")
                call = OpenCall(method(server), bearer(name))
                assert offset(call.ask(chunk(stream, x[:STEPS], 0))) == STEPS
                opened[protocol, name] = call, stream

        keys.write_text(key_file(reloaded=True))
        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: code_of(server.stub.GetModel, pb.GetModelRequest(), metadata=bearer("gamma"),
                                   timeout=TIMEOUT_S)[0] == grpc.StatusCode.UNAUTHENTICATED,
                   20, "the key file to be reloaded")

        def stream_info(stream: str, name: str) -> pb.StreamInfo:
            return server.stub.GetStream(pb.GetStreamRequest(stream_id=stream), metadata=bearer(name),
                                         timeout=TIMEOUT_S)

        for protocol, (_, chunk, offset) in PROTOCOLS.items():
            # Revoked: the call ends, the chunk sent after the reload is not applied.
            call, stream = opened[protocol, "gamma"]
            code, details = call.ended_with(chunk(stream, x[STEPS:], STEPS))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (protocol, details)
            assert "revoked or moved to another tenant" in details and KEYS["gamma"] not in details
            assert stream_info(stream, "gamma-spare").offset == STEPS, protocol

            # Moved to another tenant: the call ends; it goes on under neither tenant.
            call, stream = opened[protocol, "delta"]
            code, details = call.ended_with(chunk(stream, x[STEPS:], STEPS))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (protocol, details)
            assert stream_info(stream, "delta-spare").offset == STEPS, protocol
            assert not stream_info(stream, "epsilon").exists, protocol

            # Untouched: the call goes on across the reload.
            call, stream = opened[protocol, "alpha"]
            assert offset(call.ask(chunk(stream, x[STEPS:], STEPS))) == 2 * STEPS, protocol
            assert stream_info(stream, "alpha").offset == 2 * STEPS

        # The moved key now works for its new tenant, in that tenant's namespace.
        fresh = new_id("moved")
        answer = server.stub.Predict(native_chunk(fresh, x[:STEPS], 0), metadata=bearer("delta"), timeout=TIMEOUT_S)
        assert answer.offset == STEPS and stream_info(fresh, "epsilon").offset == STEPS
        assert not stream_info(fresh, "delta-spare").exists
        log = server.log()
        assert all(key not in log for key in KEYS.values())
    finally:
        for call, _ in opened.values():
            call.close()
