"""KServe v2 over HTTP, driven by the real `tritonclient.http`: the same sequences, rules and state as gRPC
(invariant 16, docs/invariants.md: one stream, any protocol).

A sequence split across HTTP requests equals Keras on the whole sequence, with integer and string ids; a
sequence that alternates HTTP, Triton gRPC and the native gRPC API is one stream and equals Keras too;
binary tensors (Triton's extension) and JSON tensors give the same answers; metadata, configuration,
readiness and statistics say what the gRPC protocol says. tritonclient.http has no generated protobuf
messages; the gRPC calls use whichever copy of Triton's messages this pytest process holds
(devkit.peers.triton_messages: tritonclient's and the server's own cannot both be loaded).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import requests
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from devkit.native_calls import outputs, predict
from devkit.peers import triton_messages
from devkit.processes import ServerProcess
from devkit.references import TOLERANCE, keras_whole_sequence
from lstm_stream.v1 import stream_pb2 as pb
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(180)

TIMEOUT_S = 30
MODEL = "default"
triton_pb, triton_grpc = triton_messages()


@pytest.fixture(scope="module")
def client(default_server: ServerProcess) -> Iterator[triton_http.InferenceServerClient]:
    connection = triton_http.InferenceServerClient(default_server.http_url.removeprefix("http://"),
                                                   connection_timeout=TIMEOUT_S, network_timeout=TIMEOUT_S)
    yield connection
    connection.close()


def sequence(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1.5, size=(length, 1)).astype(np.float32)


def tensor(x: np.ndarray, *, binary: bool, batched: bool = False) -> triton_http.InferInput:
    data = x[None] if batched else x
    infer_input = triton_http.InferInput("INPUT", list(data.shape), "FP32")
    infer_input.set_data_from_numpy(np.ascontiguousarray(data), binary_data=binary)
    return infer_input


def infer(client: triton_http.InferenceServerClient, x: np.ndarray, *, binary: bool = True,
          binary_output: bool = True, batched: bool = False, **options: object) -> triton_http.InferResult:
    wanted = [triton_http.InferRequestedOutput("OUTPUT", binary_data=binary_output)]
    return client.infer(MODEL, [tensor(x, binary=binary, batched=batched)], outputs=wanted, **options)


def unique_int_id() -> int:
    return uuid.uuid4().int >> 65  # positive, fits in int64


def test_sequences_with_integer_and_string_ids_equal_keras(client: triton_http.InferenceServerClient) -> None:
    x = sequence(7, seed=1)
    expected = keras_whole_sequence(DEFAULT_MODEL, x)
    for sequence_id in (unique_int_id(), f"sensor/{uuid.uuid4().hex[:8]} é"):
        pieces = [x[:3], x[3:4], x[4:]]
        got = []
        for index, piece in enumerate(pieces):
            result = infer(client, piece, binary=index % 2 == 0, sequence_id=sequence_id,
                           sequence_start=index == 0, sequence_end=index == len(pieces) - 1)
            got.append(result.as_numpy("OUTPUT"))
            assert result.get_response()["parameters"]["sequence_offset"] == sum(len(p) for p in pieces[:index + 1])
        np.testing.assert_allclose(np.concatenate(got), expected, atol=TOLERANCE)


def test_one_sequence_alternating_http_and_grpc_equals_keras(client: triton_http.InferenceServerClient,
                                                              default_server: ServerProcess) -> None:
    x = sequence(8, seed=2)
    expected = keras_whole_sequence(DEFAULT_MODEL, x)
    sequence_id = unique_int_id()
    triton_stub = triton_grpc.GRPCInferenceServiceStub(default_server.channel)

    def over_triton_grpc(piece: np.ndarray) -> np.ndarray:
        request = triton_pb.ModelInferRequest(model_name=MODEL, inputs=[triton_pb.ModelInferRequest.InferInputTensor(
            name="INPUT", datatype="FP32", shape=list(piece.shape))], raw_input_contents=[piece.tobytes()])
        request.parameters["sequence_id"].int64_param = sequence_id
        answer = triton_stub.ModelInfer(request, timeout=TIMEOUT_S)
        return np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(-1, 1)

    got = [
        infer(client, x[:2], sequence_id=sequence_id, sequence_start=True).as_numpy("OUTPUT"),
        over_triton_grpc(x[2:4]),
        # The native API reaches Triton sequence 42 as stream "42" (docs/triton.md).
        outputs(predict(default_server.stub, str(sequence_id), x[4:6], start_offset=4)),
        infer(client, x[6:], binary=False, sequence_id=sequence_id).as_numpy("OUTPUT"),
    ]
    np.testing.assert_allclose(np.concatenate(got), expected, atol=TOLERANCE)


def test_triton_timeout_parameter_is_the_request_deadline_over_http_and_grpc(
        client: triton_http.InferenceServerClient, default_server: ServerProcess) -> None:
    x, sequence_id = sequence(2, seed=4), unique_int_id()
    triton_stub = triton_grpc.GRPCInferenceServiceStub(default_server.channel)

    def over_grpc(timeout_us: int) -> object:
        request = triton_pb.ModelInferRequest(model_name=MODEL, inputs=[triton_pb.ModelInferRequest.InferInputTensor(
            name="INPUT", datatype="FP32", shape=list(x.shape))], raw_input_contents=[x.tobytes()])
        request.parameters["sequence_id"].int64_param = sequence_id
        request.parameters["timeout"].int64_param = timeout_us
        return triton_stub.ModelInfer(request, timeout=TIMEOUT_S)

    # Ten seconds is time enough; 0 is no timeout of its own, as Triton reads it.
    assert infer(client, x, sequence_id=sequence_id, sequence_start=True, timeout=10_000_000).get_response()[
        "parameters"]["sequence_offset"] == 2
    assert infer(client, x, sequence_id=sequence_id, timeout=0).get_response()["parameters"]["sequence_offset"] == 4
    # One microsecond has passed before any batch runs: refused as past its deadline, nothing applied.
    with pytest.raises(InferenceServerException) as refused:
        infer(client, x, sequence_id=sequence_id, timeout=1)
    assert refused.value.status() == "504" and "not applied" in refused.value.message(), refused.value
    with pytest.raises(grpc.RpcError) as refused_grpc:
        over_grpc(1)
    assert refused_grpc.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED, refused_grpc.value
    assert over_grpc(10_000_000).parameters["sequence_offset"].int64_param == 6
    with pytest.raises(InferenceServerException) as bad:
        infer(client, x, sequence_id=sequence_id, timeout=-1)
    assert bad.value.status() == "400" and "parameters.timeout" in bad.value.message(), bad.value


def test_binary_and_json_tensors_give_the_same_answers(client: triton_http.InferenceServerClient) -> None:
    x = sequence(5, seed=3)
    answers = [infer(client, x, binary=binary, binary_output=binary_output).as_numpy("OUTPUT")
               for binary in (True, False) for binary_output in (True, False)]
    for answer in answers:
        np.testing.assert_array_equal(answer, answers[0])
    # Outside a sequence a request is a whole sequence from zero state; [1, T, F] in gives [1, T, O] out.
    np.testing.assert_allclose(answers[0], keras_whole_sequence(DEFAULT_MODEL, x), atol=TOLERANCE)
    batched = infer(client, x, batched=True, binary=False).as_numpy("OUTPUT")
    assert batched.shape == (1, 5, 1)
    np.testing.assert_array_equal(batched[0], answers[0])


def test_health_metadata_config_and_statistics_match_the_grpc_protocol(
        client: triton_http.InferenceServerClient, default_server: ServerProcess) -> None:
    assert client.is_server_live() and client.is_server_ready()
    triton_stub = triton_grpc.GRPCInferenceServiceStub(default_server.channel)
    grpc_metadata = triton_stub.ServerMetadata(triton_pb.ServerMetadataRequest(), timeout=TIMEOUT_S)
    metadata = client.get_server_metadata()
    assert (metadata["name"], metadata["version"], metadata["extensions"]) == (
        grpc_metadata.name, grpc_metadata.version, list(grpc_metadata.extensions))

    model = client.get_model_metadata(MODEL)
    assert model["inputs"] == [{"name": "INPUT", "datatype": "FP32", "shape": [-1, -1, 1]}]
    assert model["outputs"] == [{"name": "OUTPUT", "datatype": "FP32", "shape": [-1, -1, 1]}]
    assert client.get_model_metadata(model["name"], "1")["versions"] == ["1"]
    config = client.get_model_config(MODEL)
    assert config["input"][0]["dims"] == [-1, 1] and config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["sequence_batching"]["oldest"]["preserve_ordering"] is True
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready(MODEL, "2") and not client.is_model_ready("no-such-model")

    before = client.get_inference_statistics(MODEL)["model_stats"][0]["inference_stats"]["success"]["count"]
    infer(client, sequence(2, seed=4))
    after = client.get_inference_statistics(MODEL)["model_stats"][0]
    # The gRPC protocol's statistics are the same counters: HTTP requests count there too.
    grpc_stats = triton_stub.ModelStatistics(triton_pb.ModelStatisticsRequest(name=MODEL), timeout=TIMEOUT_S)
    assert after["inference_stats"]["success"]["count"] == before + 1
    assert grpc_stats.model_stats[0].inference_stats.success.count >= before + 1
    names = [entry["name"] for entry in requests.get(f"{default_server.http_url}/v2/models/stats",
                                                     timeout=TIMEOUT_S).json()["model_stats"]]
    assert model["name"] in names


def test_refusals_name_the_field_with_the_grpc_protocols_rules(client: triton_http.InferenceServerClient,
                                                              default_server: ServerProcess) -> None:
    def refused(**options: object) -> InferenceServerException:
        with pytest.raises(InferenceServerException) as caught:
            infer(client, sequence(2, seed=5), **options)
        return caught.value

    # A continuation of a sequence that never started: Triton's rule, FAILED_PRECONDITION -> 409.
    error = refused(sequence_id=unique_int_id())
    assert error.status() == "409" and "must start the sequence" in error.message()
    with pytest.raises(InferenceServerException) as caught:
        client.infer("no-such-model", [tensor(sequence(1, seed=6), binary=True)])
    assert caught.value.status() == "404" and "no-such-model" in caught.value.message()
    wrong_shape = triton_http.InferInput("INPUT", [2, 3], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [wrong_shape])
    assert caught.value.status() == "400" and "inputs[0].shape" in caught.value.message()
    # A Triton sequence's offset mismatch carries where it stands, as gRPC's trailing metadata does.
    sequence_id = unique_int_id()
    infer(client, sequence(2, seed=7), sequence_id=sequence_id, sequence_start=True)
    body = {"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 1], "data": [0.5]}],
            "parameters": {"sequence_id": sequence_id, "start_offset": 9}}
    answer = requests.post(f"{default_server.http_url}/v2/models/{MODEL}/infer", json=body, timeout=TIMEOUT_S)
    assert answer.status_code == 409 and answer.headers["x-stream-offset"] == "2"
    assert answer.json()["code"] == "FAILED_PRECONDITION"
    info = default_server.stub.GetStream(pb.GetStreamRequest(stream_id=str(sequence_id)), timeout=TIMEOUT_S)
    assert info.offset == 2


def test_requests_are_counted_with_protocol_http(client: triton_http.InferenceServerClient,
                                                 default_server: ServerProcess) -> None:
    infer(client, sequence(1, seed=8))
    requests.get(f"{default_server.http_url}/v2/models/no-such-model", timeout=TIMEOUT_S)
    text = requests.get(f"http://127.0.0.1:{default_server.metrics_port}/metrics", timeout=TIMEOUT_S).text
    assert 'lstm_serve_requests_total{code="OK",method="ModelInfer",protocol="http"}' in text
    assert 'lstm_serve_requests_total{code="NOT_FOUND",method="ModelMetadata",protocol="http"}' in text
    assert 'lstm_serve_request_seconds_count{method="ModelInfer",protocol="http"}' in text

