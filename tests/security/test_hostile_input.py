"""Hostile input against a running server, property-based (hypothesis), on both protocols.

Invariants 6 and 12 (docs/invariants.md): whatever arrives (ids of every shape and size, NaN/Inf,
wrong and huge lengths, negative and huge offsets, wrong datatypes and shapes, raw contents that do
not match the shape, bytes that are no protobuf at all, oversized messages), every request gets a
clean status (never UNKNOWN or INTERNAL), an error never changes any stream's state, and the server
stays up.

Triton messages come from `devkit.peers.triton_messages()`: tritonclient's copy or the server's own
(the same wire format), whichever this test process loaded first.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devkit.peers import triton_messages
from devkit.processes import RedisServer, ServerProcess
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc as pb_grpc
from server.api.validation import MAX_STREAM_ID_BYTES
from server.config import DEFAULT_MODEL

triton_pb2, triton_pb2_grpc = triton_messages()
pytestmark = pytest.mark.timeout(300)

CALL_TIMEOUT_S = 30
TAG = uuid.uuid4().hex[:6]
# Streams with state before the examples start, so "an error changes nothing" is checked on real slots.
KNOWN = [f"hostile-{TAG}", f"温度/3/{TAG}", f"{{brace}} {TAG}", "4242"]
CLEAN_NATIVE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.RESOURCE_EXHAUSTED}
CLEAN_TRITON = CLEAN_NATIVE | {grpc.StatusCode.NOT_FOUND}
EXAMPLES = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def server(redis_server: RedisServer) -> Iterator[ServerProcess]:
    process = ServerProcess(redis_server.url, DEFAULT_MODEL)
    stub = process.stub
    for stream in KNOWN:
        stub.Predict(pb.PredictRequest(stream_id=stream, values=[0.5] * 3, timesteps=3, reset=True),
                     timeout=CALL_TIMEOUT_S)
    yield process
    assert process.process.poll() is None, "the server died under hostile input"
    process.stop()


# --- strategies -------------------------------------------------------------------------------------

floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
stream_ids = st.one_of(
    st.sampled_from(KNOWN),
    st.text(max_size=40),
    st.text(min_size=60, max_size=300),  # around the limit of MAX_STREAM_ID_BYTES once encoded
    # At the limit and one character past it, with 1, 2 and 4 bytes per character.
    st.sampled_from(["", " ", "a\x00b", "\n", "\x7f", "\u0085", "\u200d", "{", "}", "{}",
                     "é" * (MAX_STREAM_ID_BYTES // 2), "é" * (MAX_STREAM_ID_BYTES // 2 + 1),
                     "x" * MAX_STREAM_ID_BYTES, "x" * (MAX_STREAM_ID_BYTES + 1),
                     "\U0001f321" * (MAX_STREAM_ID_BYTES // 4), "\U0001f321" * (MAX_STREAM_ID_BYTES // 4 + 1)]),
)
offsets = st.one_of(st.none(), st.integers(0, 40), st.integers(0, 2**64 - 1))


@st.composite
def native_requests(draw: st.DrawFn) -> pb.PredictRequest:
    timesteps = draw(st.one_of(st.integers(0, 12), st.sampled_from([1024, 1025, 2**31, 2**32 - 1])))
    if draw(st.booleans()) and timesteps <= 12:
        values = draw(st.lists(floats, min_size=timesteps, max_size=timesteps))  # the right count
    else:
        values = draw(st.lists(floats, max_size=30))
    message = pb.PredictRequest(
        stream_id=draw(stream_ids), values=values, timesteps=timesteps, reset=draw(st.booleans()),
        end=draw(st.booleans()), request_id=draw(st.one_of(st.just(""), st.text(max_size=300))),
    )
    start = draw(offsets)
    if start is not None:
        message.start_offset = start
    return message


def parameter(draw: st.DrawFn, message: triton_pb2.ModelInferRequest, key: str) -> None:
    kind = draw(st.sampled_from(["absent", "string", "int64", "uint64", "bool", "double"]))
    target = message.parameters[key] if kind != "absent" else None
    if kind == "string":
        target.string_param = draw(stream_ids)
    elif kind == "int64":
        target.int64_param = draw(st.integers(-(2**63), 2**63 - 1) | st.sampled_from([0, 1, 4242]))
    elif kind == "uint64":
        target.uint64_param = draw(st.integers(0, 2**64 - 1) | st.sampled_from([0, 4242]))
    elif kind == "bool":
        target.bool_param = draw(st.booleans())
    elif kind == "double":
        target.double_param = draw(st.floats())


@st.composite
def triton_requests(draw: st.DrawFn) -> triton_pb2.ModelInferRequest:
    message = triton_pb2.ModelInferRequest(
        model_name=draw(st.sampled_from(["default", "default", "", "nope"]) | st.text(max_size=20)),
        model_version=draw(st.sampled_from(["", "1", "2"]) | st.text(max_size=5)),
        id=draw(st.text(max_size=20)),
    )
    for key in ("sequence_id", "sequence_start", "sequence_end", "start_offset", "implicit_sequence_start"):
        parameter(draw, message, key)
    timesteps = draw(st.integers(1, 12))
    shape = draw(st.one_of(
        st.sampled_from([[timesteps, 1], [1, timesteps, 1]]),
        st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(-2, 1100), max_size=4),
    ))
    for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2]))):
        message.inputs.add(
            name=draw(st.sampled_from(["INPUT", "INPUT", "x", ""])),
            datatype=draw(st.sampled_from(["FP32", "FP32", "FP64", "INT32", "BYTES", ""])),
            shape=shape,
        )
    contents = draw(st.sampled_from(["raw exact", "raw exact", "raw random", "fp32", "int", "none"]))
    if contents == "raw exact":
        values = draw(st.lists(floats, min_size=timesteps, max_size=timesteps))
        message.raw_input_contents.append(np.asarray(values, "<f4").tobytes())
    elif contents == "raw random":
        for _ in range(draw(st.integers(1, 2))):
            message.raw_input_contents.append(draw(st.binary(max_size=64)))
    elif contents in ("fp32", "int") and message.inputs:
        if contents == "fp32":
            message.inputs[0].contents.fp32_contents.extend(draw(st.lists(floats, max_size=20)))
        else:
            message.inputs[0].contents.int_contents.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1),
                                                                         max_size=20)))
    if draw(st.booleans()):
        message.outputs.add(name=draw(st.sampled_from(["OUTPUT", "PROBS", ""])))
    return message


# --- checks --------------------------------------------------------------------------------------------

def snapshot(stub: pb_grpc.StreamInferenceStub, stream_id: str) -> tuple | None:
    """The stream's state as GetStream shows it, or None when the id itself is refused."""
    try:
        info = stub.GetStream(pb.GetStreamRequest(stream_id=stream_id), timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (stream_id, error.code(), error.details())
        return None
    return info.exists, info.offset, info.updated_unix_ms, info.model_fingerprint


def outcome(call, message) -> tuple[grpc.StatusCode, str]:
    try:
        call(message, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def triton_stream_id(message: triton_pb2.ModelInferRequest) -> str | None:
    if "sequence_id" not in message.parameters:
        return None
    parameter = message.parameters["sequence_id"]
    kind = parameter.WhichOneof("parameter_choice")
    if kind == "string_param":
        return parameter.string_param or None
    if kind in ("int64_param", "uint64_param"):
        value = getattr(parameter, kind)
        return str(value) if value > 0 else None
    return None


# --- properties ------------------------------------------------------------------------------------------

@EXAMPLES
@given(message=native_requests())
def test_native_predict_answers_cleanly_and_errors_change_nothing(server: ServerProcess, message) -> None:
    before = snapshot(server.stub, message.stream_id)
    code, details = outcome(server.stub.Predict, message)
    assert code in CLEAN_NATIVE, (code, details)
    if code != grpc.StatusCode.OK:
        assert details
        assert snapshot(server.stub, message.stream_id) == before, (code, details)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(native_requests(), min_size=1, max_size=6))
def test_native_streams_answer_every_request_cleanly(server: ServerProcess, messages) -> None:
    befores = {m.stream_id: snapshot(server.stub, m.stream_id) for m in messages}
    replies = list(server.stub.PredictStream(iter(messages), timeout=CALL_TIMEOUT_S))
    assert len(replies) == len(messages)  # one answer each; the stream itself ended OK
    codes = [grpc.StatusCode.OK.value[0] if not r.HasField("error") else r.error.code for r in replies]
    assert set(codes) <= {c.value[0] for c in CLEAN_NATIVE}, replies
    if all(r.HasField("error") for r in replies):
        for stream_id, before in befores.items():
            assert snapshot(server.stub, stream_id) == before


@EXAMPLES
@given(message=triton_requests())
def test_triton_model_infer_answers_cleanly_and_errors_change_nothing(server: ServerProcess, message) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = triton_pb2_grpc.GRPCInferenceServiceStub(channel)
        stream_id = triton_stream_id(message)
        before = snapshot(server.stub, stream_id) if stream_id else None
        code, details = outcome(stub.ModelInfer, message)
    assert code in CLEAN_TRITON, (code, details)
    if code != grpc.StatusCode.OK and stream_id:
        assert details
        assert snapshot(server.stub, stream_id) == before, (code, details)


# --- what hypothesis does not reach: bytes that are no message, and oversized messages -------------------

@pytest.mark.parametrize("method", ["/lstm_stream.v1.StreamInference/Predict",
                                    "/lstm_stream.v1.StreamInference/GetStream",
                                    "/inference.GRPCInferenceService/ModelInfer",
                                    "/inference.GRPCInferenceService/ServerLive"])
def test_bytes_that_are_no_message_get_invalid_argument(server: ServerProcess, method: str) -> None:
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(method)
        corrupt = [b"\xff\xff\xff", b"\x0a\x05"]
        if not method.endswith("ServerLive"):  # field 1 is a string there: bad UTF-8 in it
            corrupt.append(b"\x0a\x02\xff\xfe")
        for data in corrupt:
            code, details = outcome(call, data)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf message" in details, details


def test_a_corrupt_message_on_a_stream_is_answered_and_the_stream_goes_on(server: ServerProcess) -> None:
    good = pb.PredictRequest(stream_id=f"corrupt-{TAG}", values=[1.0, 2.0], timesteps=2, reset=True)
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream("/lstm_stream.v1.StreamInference/PredictStream",
                                     response_deserializer=pb.PredictResponse.FromString)
        replies = list(call(iter([b"\x0a\x02\xff\xfe", good.SerializeToString()]), timeout=CALL_TIMEOUT_S))
    assert replies[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not replies[1].HasField("error") and replies[1].offset == 2


def test_oversized_messages_are_refused_on_both_protocols(server: ServerProcess) -> None:
    before = snapshot(server.stub, KNOWN[0])
    huge = np.ones(300_000, np.float32)  # 1.2 MB; the largest valid chunk is 4 KiB of floats
    native = pb.PredictRequest(stream_id=KNOWN[0], values=huge, timesteps=1024)
    assert outcome(server.stub.Predict, native)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    triton = triton_pb2.ModelInferRequest(model_name="default", raw_input_contents=[huge.tobytes()])
    triton.parameters["sequence_id"].string_param = KNOWN[0]
    triton.inputs.add(name="INPUT", datatype="FP32", shape=[300_000, 1])
    with grpc.insecure_channel(server.address) as channel:
        code, details = outcome(triton_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer, triton)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert snapshot(server.stub, KNOWN[0]) == before
