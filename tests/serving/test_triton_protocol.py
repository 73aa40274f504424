"""The Triton / KServe v2 protocol, driven by the real `tritonclient[grpc]` package.

Triton's sequence parameters map onto streams: a sequence split across requests equals Keras on the
whole sequence and the native API; it is one slot whichever protocol touches it; a request outside a
sequence is stateless; bad requests are refused by field and change nothing.

This process imports tritonclient's generated `inference.*` messages, so it must never import the
server's own (`lstm_stream.triton`, the same message names): the wire-format check reads those in a
child process.
"""

from __future__ import annotations

import itertools
import json
import queue
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import model_config_pb2 as triton_config_pb2
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.grpc import service_pb2_grpc as triton_pb2_grpc
from tritonclient.utils import InferenceServerException

from devkit import ROOT
from devkit.native_calls import outputs, predict, status_of
from devkit.processes import ServerProcess
from devkit.references import TOLERANCE, keras_whole_sequence, keras_whole_sequences
from lstm_stream.v1 import stream_pb2 as pb
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(180)

CALL_TIMEOUT_S = 30
MODEL = "default"  # the alias every deployment answers to, whatever its Keras model's name


@pytest.fixture(scope="module")
def client(default_server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(url=default_server.address) as connection:
        yield connection


def sequence(length: int, features: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1.5, size=(length, features)).astype(np.float32)


def split(x: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
    assert sum(lengths) == len(x)
    bounds = np.cumsum([0, *lengths])
    return [x[a:b] for a, b in itertools.pairwise(bounds)]


def tensor(x: np.ndarray, *, batched: bool = False) -> triton.InferInput:
    data = x[None] if batched else x
    infer_input = triton.InferInput("INPUT", list(data.shape), "FP32")
    infer_input.set_data_from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    return infer_input


def infer(client: triton.InferenceServerClient, x: np.ndarray, *, batched: bool = False, model: str = MODEL,
          **options: object) -> triton.InferResult:
    return client.infer(model, [tensor(x, batched=batched)], client_timeout=CALL_TIMEOUT_S, **options)


def failure(call: Callable[..., object], *args: object, **kwargs: object) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return caught.value


def unique_int_id() -> int:
    return uuid.uuid4().int >> 65  # positive, fits in int64


def native_offset(server: ServerProcess, stream_id: str) -> int | None:
    info = server.stub.GetStream(pb.GetStreamRequest(stream_id=stream_id), timeout=CALL_TIMEOUT_S)
    return info.offset if info.exists else None


def test_health_metadata_and_config_describe_a_sequence_model(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    extensions = client.get_server_metadata().extensions
    assert "sequence" in extensions and "sequence(string_id)" in extensions

    metadata = client.get_model_metadata(MODEL)
    name = metadata.name
    assert client.is_model_ready(name) and client.is_model_ready(MODEL) and client.is_model_ready(name, "1")
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready(name, "2")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("INPUT", "FP32", [-1, -1, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("OUTPUT", "FP32", [-1, -1, 1])]
    assert client.get_model_metadata(name).name == name

    config = client.get_model_config(MODEL).config
    assert config.name == name
    assert config.HasField("sequence_batching")
    assert config.max_batch_size >= 1
    fp32 = triton_config_pb2.TYPE_FP32
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("INPUT", fp32, [-1, 1])]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("OUTPUT", fp32, [-1, 1])]

    for call in (client.get_model_metadata, client.get_model_config):
        error = failure(call, "no-such-model")
        assert error.status() == "StatusCode.NOT_FOUND" and "no-such-model" in error.message()
    error = failure(infer, client, sequence(3), model="no-such-model")
    assert error.status() == "StatusCode.NOT_FOUND"


def test_served_on_the_native_port_and_listed_by_reflection(default_server: ServerProcess) -> None:
    with grpc.insecure_channel(default_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        [reply] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=CALL_TIMEOUT_S)
    services = {service.name for service in reply.list_services_response.service}
    assert {"inference.GRPCInferenceService", "lstm_stream.v1.StreamInference"} <= services


def test_sequence_over_infer_equals_keras_and_the_native_api(
    client: triton.InferenceServerClient, default_server: ServerProcess
) -> None:
    x = sequence(57, seed=1)
    chunks = split(x, [10, 1, 30, 16])
    sequence_id = unique_int_id()
    got = []
    for number, chunk in enumerate(chunks):
        last = number == len(chunks) - 1
        batched = number % 2 == 1  # Triton's batched form [1, T, F] and the plain [T, F], mixed
        result = infer(client, chunk, batched=batched, sequence_id=sequence_id, sequence_start=number == 0,
                       sequence_end=last, request_id=f"req-{number}")
        y = result.as_numpy("OUTPUT")
        assert y.shape == ((1, len(chunk), 1) if batched else (len(chunk), 1))
        response = result.get_response()
        assert response.id == f"req-{number}"
        assert response.parameters["sequence_offset"].int64_param == sum(len(c) for c in chunks[: number + 1])
        if not last:
            assert native_offset(default_server, str(sequence_id)) == response.parameters["sequence_offset"].int64_param
        got.append(y.reshape(len(chunk), 1))

    triton_outputs = np.concatenate(got)
    assert np.max(np.abs(triton_outputs - keras_whole_sequence(DEFAULT_MODEL, x))) <= TOLERANCE

    native_id = f"native-{uuid.uuid4().hex}"
    native = [outputs(predict(default_server.stub, native_id, chunk, reset=n == 0)) for n, chunk in enumerate(chunks)]
    assert np.max(np.abs(triton_outputs - np.concatenate(native))) <= TOLERANCE

    # sequence_end dropped the slot: continuing is refused, as Triton refuses a sequence without START.
    assert native_offset(default_server, str(sequence_id)) is None
    error = failure(infer, client, chunks[0], sequence_id=sequence_id)
    assert error.status() == "StatusCode.FAILED_PRECONDITION"
    assert native_offset(default_server, str(sequence_id)) is None


def test_sequences_over_a_stream_answer_in_order_and_equal_keras(client: triton.InferenceServerClient) -> None:
    """Three interleaved sequences (two int ids, one string id) on one stream, with bad requests among them."""
    answers: queue.Queue[tuple[triton.InferResult | None, InferenceServerException | None]] = queue.Queue()
    streams = {
        unique_int_id(): split(sequence(40, seed=2), [7, 20, 13]),
        unique_int_id(): split(sequence(25, seed=3), [1, 1, 23]),
        f"sensor-{uuid.uuid4().hex[:8]}": split(sequence(33, seed=4), [16, 9, 8]),
    }
    sent: list[tuple[object, int] | str] = []  # (sequence id, chunk number), or the kind of a bad request
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for number in range(3):
            for sequence_id, chunks in streams.items():
                client.async_stream_infer(
                    MODEL, [tensor(chunks[number], batched=number == 1)], request_id=f"{sequence_id}/{number}",
                    sequence_id=sequence_id, sequence_start=number == 0, sequence_end=number == 2,
                    enable_empty_final_response=True,
                )
                sent.append((sequence_id, number))
            if number == 0:  # failures in the middle of the stream must not stop it
                bad = triton.InferInput("INPUT", [2, 1], "FP64")
                bad.set_data_from_numpy(np.zeros((2, 1), np.float64))
                client.async_stream_infer(MODEL, [bad], sequence_id=next(iter(streams)))
                sent.append("wrong datatype")
                client.async_stream_infer("no-such-model", [tensor(sequence(2))])
                sent.append("unknown model")
        received = [answers.get(timeout=CALL_TIMEOUT_S) for _ in sent]
    finally:
        client.stop_stream()

    got: dict[object, list[np.ndarray]] = {sequence_id: [] for sequence_id in streams}
    for what, (result, error) in zip(sent, received, strict=True):
        if isinstance(what, str):
            assert result is None and error is not None, what
            expected = "INVALID_ARGUMENT" if what == "wrong datatype" else "NOT_FOUND"
            assert expected in error.message(), (what, error.message())
            continue
        assert error is None, (what, error)
        sequence_id, number = what
        response = result.get_response()
        assert response.id == f"{sequence_id}/{number}"  # answers come in request order
        assert response.parameters["triton_final_response"].bool_param
        got[sequence_id].append(result.as_numpy("OUTPUT").reshape(-1, 1))
    references = keras_whole_sequences(DEFAULT_MODEL, [np.concatenate(chunks) for chunks in streams.values()])
    for sequence_id, expected in zip(streams, references, strict=True):
        assert np.max(np.abs(np.concatenate(got[sequence_id]) - expected)) <= TOLERANCE, sequence_id


def test_string_sequence_ids_are_stream_ids(
    client: triton.InferenceServerClient, default_server: ServerProcess
) -> None:
    x = sequence(12, seed=5)
    first, second = split(x, [5, 7])
    sequence_id = f"line-3/pump-{uuid.uuid4().hex[:6]}"
    infer(client, first, sequence_id=sequence_id, sequence_start=True)
    assert native_offset(default_server, sequence_id) == 5
    y = infer(client, second, sequence_id=sequence_id).as_numpy("OUTPUT")
    assert np.max(np.abs(y - keras_whole_sequence(DEFAULT_MODEL, x)[5:])) <= TOLERANCE

    for bad_id in ("tab\there", "s" * 257, "é" * 129):
        error = failure(infer, client, first, sequence_id=bad_id, sequence_start=True)
        assert error.status() == "StatusCode.INVALID_ARGUMENT" and "parameters.sequence_id" in error.message()


def test_requests_without_a_sequence_are_stateless(client: triton.InferenceServerClient) -> None:
    x = sequence(20, seed=6)
    expected = keras_whole_sequence(DEFAULT_MODEL, x)
    for batched in (False, True, False):  # again and again: nothing carries over
        y = infer(client, x, batched=batched, request_id="one-shot").as_numpy("OUTPUT").reshape(-1, 1)
        assert np.max(np.abs(y - expected)) <= TOLERANCE
    # sequence_id 0 and "" are Triton's "no sequence" (tritonclient then sends no sequence parameters).
    for no_sequence in (0, ""):
        y = infer(client, x, sequence_id=no_sequence).as_numpy("OUTPUT")
        assert np.max(np.abs(y - expected)) <= TOLERANCE


def test_a_sequence_must_start_unless_the_client_opts_out(
    client: triton.InferenceServerClient, default_server: ServerProcess
) -> None:
    x = sequence(9, seed=7)
    sequence_id = unique_int_id()
    error = failure(infer, client, x, sequence_id=sequence_id)
    assert error.status() == "StatusCode.FAILED_PRECONDITION" and str(sequence_id) in error.message()
    assert native_offset(default_server, str(sequence_id)) is None

    y = infer(client, x, sequence_id=sequence_id, parameters={"implicit_sequence_start": True}).as_numpy("OUTPUT")
    assert np.max(np.abs(y - keras_whole_sequence(DEFAULT_MODEL, x))) <= TOLERANCE
    assert native_offset(default_server, str(sequence_id)) == 9


def test_start_offset_makes_retries_exactly_once(
    client: triton.InferenceServerClient, default_server: ServerProcess
) -> None:
    x = sequence(12, seed=11)
    a, b = split(x, [5, 7])
    sequence_id = f"offsets-{uuid.uuid4().hex[:8]}"
    first = infer(client, a, sequence_id=sequence_id, sequence_start=True, parameters={"start_offset": 0})
    retry = infer(client, a, sequence_id=sequence_id, sequence_start=True, parameters={"start_offset": 0})
    assert retry.get_response().parameters["replayed"].bool_param
    np.testing.assert_array_equal(retry.as_numpy("OUTPUT"), first.as_numpy("OUTPUT"))
    assert native_offset(default_server, sequence_id) == 5

    error = failure(infer, client, b, sequence_id=sequence_id, parameters={"start_offset": 3})
    assert error.status() == "StatusCode.FAILED_PRECONDITION" and "offset 5" in error.message()
    y = infer(client, b, sequence_id=sequence_id, parameters={"start_offset": 5}).as_numpy("OUTPUT")
    assert np.max(np.abs(y - keras_whole_sequence(DEFAULT_MODEL, x)[5:])) <= TOLERANCE


def raw_request(sequence_id: str, x: np.ndarray, *, name: str = "INPUT", datatype: str = "FP32",
                raw: bytes | None = None, extra_raw: bytes | None = None, typed: list[float] | None = None,
                output: str | None = None, start_as_int: bool = False) -> triton_pb2.ModelInferRequest:
    """A hand-made request, for the malformed cases tritonclient's helpers refuse to build.

    The data goes in raw_input_contents (`raw` replaces it); `typed` adds fp32_contents, alone when
    `raw` is b"" (no raw contents at all).
    """
    request = triton_pb2.ModelInferRequest(model_name=MODEL)
    request.parameters["sequence_id"].string_param = sequence_id
    if start_as_int:
        request.parameters["sequence_start"].int64_param = 1
    request.inputs.add(name=name, datatype=datatype, shape=list(x.shape))
    raw = x.astype("<f4").tobytes() if raw is None else raw
    if raw:
        request.raw_input_contents.append(raw)
    if extra_raw is not None:
        request.raw_input_contents.append(extra_raw)
    if typed is not None:
        request.inputs[0].contents.fp32_contents.extend(typed)
    if output is not None:
        request.outputs.add(name=output)
    return request


def test_malformed_requests_are_refused_by_field_and_change_nothing(
    client: triton.InferenceServerClient, default_server: ServerProcess
) -> None:
    x = sequence(10, seed=8)
    first, second = split(x, [6, 4])
    sequence_id = f"bad-input-{uuid.uuid4().hex[:8]}"
    infer(client, first, sequence_id=sequence_id, sequence_start=True)

    chunk = np.ones((3, 1), np.float32)
    with_nan = chunk.copy()
    with_nan[1, 0] = np.nan
    cases: list[tuple[str, triton_pb2.ModelInferRequest, str]] = [
        ("wrong datatype", raw_request(sequence_id, chunk, datatype="FP64"), "inputs[0].datatype"),
        ("wrong input name", raw_request(sequence_id, chunk, name="x"), "inputs[0].name"),
        ("two features", raw_request(sequence_id, np.ones((3, 2), np.float32)), "inputs[0].shape"),
        ("batch of two", raw_request(sequence_id, np.ones((2, 3, 1), np.float32)), "inputs[0].shape"),
        ("one-dimensional", raw_request(sequence_id, np.ones(3, np.float32)), "inputs[0].shape"),
        ("no timesteps", raw_request(sequence_id, np.ones((0, 1), np.float32)), "inputs[0].shape"),
        ("raw too short", raw_request(sequence_id, chunk, raw=b"\0" * 8), "raw_input_contents[0]"),
        ("raw too long", raw_request(sequence_id, chunk, raw=b"\0" * 16), "raw_input_contents[0]"),
        ("raw for two inputs", raw_request(sequence_id, chunk, extra_raw=b"\0" * 12), "raw_input_contents"),
        ("raw and typed", raw_request(sequence_id, chunk, typed=[1.0] * 3), "inputs[0].contents"),
        ("typed too short", raw_request(sequence_id, chunk, raw=b"", typed=[1.0, 2.0]), "fp32_contents"),
        ("NaN", raw_request(sequence_id, with_nan), "raw_input_contents[0]"),
        ("unknown output", raw_request(sequence_id, chunk, output="PROBS"), "outputs[0].name"),
        ("start as int", raw_request(sequence_id, chunk, start_as_int=True), "parameters.sequence_start"),
    ]
    with grpc.insecure_channel(default_server.address) as channel:
        stub = triton_pb2_grpc.GRPCInferenceServiceStub(channel)
        for what, request, field in cases:
            code, message, _ = status_of(stub.ModelInfer, request, timeout=CALL_TIMEOUT_S)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (what, code, message)
            assert field in message, (what, message)
        # Typed contents (fp32_contents instead of raw bytes) are accepted when right.
        typed_request = raw_request(sequence_id, second, raw=b"", typed=second.ravel().tolist())
        typed = stub.ModelInfer(typed_request, timeout=CALL_TIMEOUT_S)
    # Nothing above moved the stream: the chunk that follows continues exactly where the first left off.
    y = np.frombuffer(typed.raw_output_contents[0], dtype="<f4").reshape(4, 1)
    assert np.max(np.abs(y - keras_whole_sequence(DEFAULT_MODEL, x)[6:])) <= TOLERANCE
    assert native_offset(default_server, sequence_id) == 10


def test_native_and_triton_share_one_slot(client: triton.InferenceServerClient, default_server: ServerProcess) -> None:
    x = sequence(40, seed=9)
    a, b, c, d = split(x, [8, 12, 5, 15])
    expected = keras_whole_sequence(DEFAULT_MODEL, x)

    # Native starts "<n>", Triton continues integer sequence n, native continues, Triton ends.
    number = unique_int_id()
    got = [outputs(predict(default_server.stub, str(number), a, reset=True))]
    got.append(infer(client, b, sequence_id=number).as_numpy("OUTPUT"))
    got.append(outputs(predict(default_server.stub, str(number), c)))
    got.append(infer(client, d, batched=True, sequence_id=number, sequence_end=True).as_numpy("OUTPUT")[0])
    assert np.max(np.abs(np.concatenate(got) - expected)) <= TOLERANCE
    assert native_offset(default_server, str(number)) is None

    # The other way round, with a string id: Triton starts, native continues, Triton continues.
    name = f"shared-{uuid.uuid4().hex[:8]}"
    got = [infer(client, a, sequence_id=name, sequence_start=True).as_numpy("OUTPUT")]
    got.append(outputs(predict(default_server.stub, name, b)))
    got.append(infer(client, np.concatenate([c, d]), sequence_id=name).as_numpy("OUTPUT"))
    assert np.max(np.abs(np.concatenate(got) - expected)) <= TOLERANCE
    assert native_offset(default_server, name) == 40


def test_model_statistics_count_requests(client: triton.InferenceServerClient) -> None:
    def counts() -> tuple[int, int]:
        stats = client.get_inference_statistics(MODEL).model_stats[0].inference_stats
        return stats.success.count, stats.fail.count

    success, fail = counts()
    infer(client, sequence(3))
    failure(infer, client, sequence(2), sequence_id=unique_int_id())  # no START: refused
    now_success, now_fail = counts()
    assert now_success >= success + 1 and now_fail >= fail + 1
    assert len(client.get_inference_statistics().model_stats) == 1
    assert failure(client.get_inference_statistics, "no-such-model").status() == "StatusCode.NOT_FOUND"


def test_model_statistics_have_the_stages_perf_analyzer_reads(client: triton.InferenceServerClient) -> None:
    """perf_analyzer without -x finds the version whose queue count moved, and splits the request time into
    queue and compute stages that add up to at most the request time."""
    def stats() -> triton_pb2.ModelStatistics:
        return client.get_inference_statistics(MODEL).model_stats[0]

    before = stats()
    number = unique_int_id()
    for index, chunk in enumerate(split(sequence(6), [2, 2, 2])):
        infer(client, chunk, sequence_id=number, sequence_start=index == 0, sequence_end=index == 2)
    after = stats()
    assert after.name == MODEL and after.version == "1"  # the name asked for; a version perf_analyzer parses
    served = after.inference_stats.success.count - before.inference_stats.success.count
    assert served >= 3 and after.inference_count - before.inference_count == served
    assert after.execution_count > before.execution_count
    stages = ("queue", "compute_input", "compute_infer", "compute_output")
    for stage in stages:
        assert getattr(after.inference_stats, stage).count - getattr(before.inference_stats, stage).count == served
    stage_ns = sum(getattr(after.inference_stats, stage).ns - getattr(before.inference_stats, stage).ns
                   for stage in stages)
    assert 0 < stage_ns <= after.inference_stats.success.ns - before.inference_stats.success.ns


def test_last_step_model_with_two_features(last_step_server: ServerProcess, small_models: dict[str, Path]) -> None:
    """Shapes follow the model: 2 features in, one row of 3 outputs per request (the chunk's last step)."""
    server, model = last_step_server, small_models["last_step"]
    x = sequence(30, features=2, seed=10)
    with triton.InferenceServerClient(url=server.address) as connection:
        metadata = connection.get_model_metadata(MODEL)
        assert [list(t.shape) for t in metadata.inputs] == [[-1, -1, 2]]
        assert [list(t.shape) for t in metadata.outputs] == [[-1, 1, 3]]
        config = connection.get_model_config(MODEL).config
        assert [list(i.dims) for i in config.input] == [[-1, 2]] and [list(o.dims) for o in config.output] == [[1, 3]]

        first = infer(connection, x[:11], batched=True, sequence_id="last", sequence_start=True).as_numpy("OUTPUT")
        assert first.shape == (1, 1, 3)
        assert np.max(np.abs(first[0] - keras_whole_sequence(model, x[:11]))) <= TOLERANCE
        last = infer(connection, x[11:], sequence_id="last", sequence_end=True).as_numpy("OUTPUT")
        assert last.shape == (1, 3)
        assert np.max(np.abs(last - keras_whole_sequence(model, x))) <= TOLERANCE


# Runs in a child process: it imports the server's generated `inference.*` messages, which must not meet
# tritonclient's in one descriptor pool.
_DUMP_OURS = """
import json
from lstm_stream.triton import grpc_service_pb2, model_config_pb2

def message(descriptor, out):
    out[descriptor.full_name] = {
        f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else
                 (f.enum_type.full_name if f.enum_type else "")]
        for f in descriptor.fields
    }
    for nested in descriptor.nested_types:
        message(nested, out)

messages, enums = {}, {}
for module in (grpc_service_pb2, model_config_pb2):
    for descriptor in module.DESCRIPTOR.message_types_by_name.values():
        message(descriptor, messages)
    for enum in module.DESCRIPTOR.enum_types_by_name.values():
        enums[enum.full_name] = {v.name: v.number for v in enum.values}
service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
methods = {m.name: [m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming]
           for m in service.methods}
print(json.dumps({"service": service.full_name, "messages": messages, "enums": enums, "methods": methods}))
"""


def test_wire_format_matches_tritonclient() -> None:
    """Every message, field number and type the server declares is the one tritonclient encodes."""
    dumped = subprocess.run([sys.executable, "-c", _DUMP_OURS], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=True)
    ours = json.loads(dumped.stdout)
    pool = triton_pb2.DESCRIPTOR.pool
    for name, fields in ours["messages"].items():
        theirs = pool.FindMessageTypeByName(name)
        for field_name, (number, kind, repeated, type_name) in fields.items():
            other = theirs.fields_by_name[field_name]
            type_of_other = other.message_type or other.enum_type
            assert [other.number, other.type, other.is_repeated, type_of_other.full_name if type_of_other else ""] == [
                number, kind, repeated, type_name
            ], f"{name}.{field_name}"
    for name, values in ours["enums"].items():
        theirs = {v.name: v.number for v in pool.FindEnumTypeByName(name).values}
        assert values == {key: theirs[key] for key in values}, name
    service = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours["service"] == service.full_name == "inference.GRPCInferenceService"
    for method_name, signature in ours["methods"].items():
        method = service.methods_by_name[method_name]
        assert signature == [method.input_type.full_name, method.output_type.full_name, method.client_streaming,
                             method.server_streaming], method_name
