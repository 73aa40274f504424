"""The native API as JSON over HTTP, and bodies of every bad kind refused with nothing applied (invariant 16,
docs/invariants.md: one stream, any protocol).

Same offsets, replays and errors as gRPC (the gRPC code in the body, the usual HTTP status, x-stream-offset
as a header); stream ids percent-encoded in the path, any id the gRPC API takes; a refused body (bad JSON,
wrong types, ragged rows, strings for numbers, too large, truncated, a binary section that does not add up)
is answered 4xx naming the field, and the stream it named is where it was.
"""

from __future__ import annotations

import json
import socket
import uuid
from urllib.parse import quote

import numpy as np
import pytest
import requests

from devkit.native_calls import outputs, predict
from devkit.processes import ServerProcess
from devkit.references import TOLERANCE, keras_whole_sequence
from lstm_stream.v1 import stream_pb2 as pb
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(180)

TIMEOUT_S = 30


def new_id(name: str = "json") -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def url(server: ServerProcess, stream_id: str, verb: str = "") -> str:
    return f"{server.http_url}/v1/streams/{quote(stream_id, safe='')}{':' + verb if verb else ''}"


def offset_over_grpc(server: ServerProcess, stream_id: str) -> int | None:
    info = server.stub.GetStream(pb.GetStreamRequest(stream_id=stream_id), timeout=TIMEOUT_S)
    return int(info.offset) if info.exists else None


def test_predict_as_rows_or_flat_continues_over_grpc_and_equals_keras(default_server: ServerProcess) -> None:
    x = np.random.default_rng(11).normal(size=(6, 1)).astype(np.float32)
    stream_id = new_id("sensor/7 ü:{x}")  # a slash, a space, a colon, braces and non-ASCII: all percent-encoded
    first = requests.post(url(default_server, stream_id, "predict"), timeout=TIMEOUT_S,
                          json={"values": x[:2].tolist(), "start_offset": 0})
    assert first.status_code == 200
    answer = first.json()
    assert answer["stream_id"] == stream_id and answer["offset"] == "2" and answer["replayed"] is False
    flat = requests.post(url(default_server, stream_id, "predict"), timeout=TIMEOUT_S,
                         json={"values": x[2:4].ravel().tolist(), "timesteps": 2, "start_offset": 2}).json()
    last = outputs(predict(default_server.stub, stream_id, x[4:], start_offset=4))
    got = np.concatenate([np.reshape(answer["outputs"], (2, 1)), np.reshape(flat["outputs"], (2, 1)), last])
    np.testing.assert_allclose(got, keras_whole_sequence(DEFAULT_MODEL, x), atol=TOLERANCE)

    info = requests.get(url(default_server, stream_id), timeout=TIMEOUT_S).json()
    assert info["exists"] is True and info["offset"] == "6" and info["stream_id"] == stream_id
    # A retry of an applied chunk is answered again, not applied twice; a wrong offset says where the stream is.
    replay = requests.post(url(default_server, stream_id, "predict"), timeout=TIMEOUT_S,
                           json={"values": x[2:4].tolist(), "start_offset": 2})
    assert replay.status_code == 200 and replay.json()["replayed"] is True
    mismatch = requests.post(url(default_server, stream_id, "predict"), timeout=TIMEOUT_S,
                             json={"values": [[0.0]], "start_offset": 9})
    assert mismatch.status_code == 409 and mismatch.headers["x-stream-offset"] == "6"
    assert mismatch.json()["code"] == "FAILED_PRECONDITION" and mismatch.json()["current_offset"] == 6
    reset = requests.post(url(default_server, stream_id, "reset"), timeout=TIMEOUT_S)
    assert reset.status_code == 200 and reset.json() == {"existed": True}
    assert offset_over_grpc(default_server, stream_id) is None


def test_model_and_unknown_things(default_server: ServerProcess) -> None:
    model = requests.get(f"{default_server.http_url}/v1/model", timeout=TIMEOUT_S).json()
    assert model["input_features"] == 1 and model["max_chunk_timesteps"] == 1024
    unknown = requests.get(f"{default_server.http_url}/v1/model?model=no-such-model", timeout=TIMEOUT_S)
    assert unknown.status_code == 404 and unknown.json()["code"] == "NOT_FOUND"
    assert requests.get(f"{default_server.http_url}/v1/nothing", timeout=TIMEOUT_S).status_code == 404
    assert requests.post(url(default_server, "s", "explode"), timeout=TIMEOUT_S).status_code == 404
    not_utf8 = requests.get(f"{default_server.http_url}/v1/streams/%ff%fe", timeout=TIMEOUT_S)
    assert not_utf8.status_code == 400 and "stream_id" in not_utf8.json()["error"]
    control = requests.get(f"{default_server.http_url}/v1/streams/a%00b", timeout=TIMEOUT_S)
    assert control.status_code == 400 and "stream_id" in control.json()["error"]


INFER = "/v2/models/default/infer"
PREDICT = "/v1/streams/{stream}:predict"

# (path, body, headers, the HTTP status, what the error must name)
BAD_BODIES = [
    (PREDICT, b"{not json", {}, 400, "body"),
    (PREDICT, b"[1, 2]", {}, 400, "body"),
    (PREDICT, b'{"values": "0.5", "start_offset": 0}', {}, 400, "values"),
    (PREDICT, b'{"values": [[0.5], [0.1, 0.2]], "start_offset": 0}', {}, 400, "values[1]"),
    (PREDICT, b'{"values": [[0.5], [0.1]], "timesteps": 3, "start_offset": 0}', {}, 400, "timesteps"),
    (PREDICT, b'{"values": [0.5], "timesteps": "one", "start_offset": 0}', {}, 400, "timesteps"),
    (PREDICT, b'{"values": [0.5], "timesteps": 1, "start_offset": -1}', {}, 400, "start_offset"),
    (PREDICT, b'{"values": [0.5], "timesteps": 1, "no_such_field": 1}', {}, 400, "no_such_field"),
    (PREDICT, b'{"values": [0.5, 0.1], "timesteps": 1, "start_offset": 0}', {}, 400, "values"),
    (PREDICT, b'{"values": [[0.5]], "stream_id": "another", "start_offset": 0}', {}, 400, "stream_id"),
    (INFER, b'{"inputs": {}}', {}, 400, "inputs"),
    (INFER, b'{"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 1], "data": ["0.5"]}], '
            b'"parameters": {"sequence_id": "{stream}"}}', {}, 400, "inputs[0].data"),
    (INFER, b'{"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [2, 1], "data": [[0.5], [0.1, 3]]}], '
            b'"parameters": {"sequence_id": "{stream}"}}', {}, 400, "inputs[0].data"),
    (INFER, b'{"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 1], "data": [null]}], '
            b'"parameters": {"sequence_id": "{stream}"}}', {}, 400, "inputs[0].data"),
    (INFER, b'{"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 1], "data": [0.5]}], '
            b'"parameters": {"sequence_id": "{stream}", "sequence_start": "true"}}', {}, 400,
     "parameters.sequence_start"),
    (INFER, b'{"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 1], "data": [0.5]}], '
            b'"parameters": {"sequence_id": [1]}}', {}, 400, "parameters.sequence_id"),
    (INFER, b'{"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 1], '
            b'"parameters": {"binary_data_size": 8}}], "parameters": {"sequence_id": "{stream}"}}XXXX',
     {"Inference-Header-Content-Length": "LEN"}, 400, "binary_data_size"),
    (INFER, b'{"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 1], "data": [0.5]}], '
            b'"parameters": {"sequence_id": "{stream}"}}', {"Inference-Header-Content-Length": "99999"}, 400,
     "Inference-Header-Content-Length"),
]


@pytest.mark.parametrize(("path", "body", "headers", "status", "names"), BAD_BODIES,
                         ids=[f"{i}-{case[4]}" for i, case in enumerate(BAD_BODIES)])
def test_bad_bodies_are_refused_by_field_and_change_nothing(
        default_server: ServerProcess, path: str, body: bytes, headers: dict[str, str], status: int,
        names: str) -> None:
    stream_id = new_id("bad")
    predict(default_server.stub, stream_id, np.ones((2, 1), dtype=np.float32), start_offset=0, reset=True)
    body = body.replace(b"{stream}", stream_id.encode())
    if headers.get("Inference-Header-Content-Length") == "LEN":
        headers = {"Inference-Header-Content-Length": str(body.index(b"XXXX"))}
    answer = requests.post(default_server.http_url + path.replace("{stream}", stream_id), data=body,
                           headers={"Content-Type": "application/json", **headers}, timeout=TIMEOUT_S)
    assert answer.status_code == status, answer.text
    assert answer.json()["code"] == "INVALID_ARGUMENT" and names in answer.json()["error"]
    assert offset_over_grpc(default_server, stream_id) == 2


def test_huge_and_truncated_bodies_are_refused_and_change_nothing(default_server: ServerProcess) -> None:
    stream_id = new_id("huge")
    predict(default_server.stub, stream_id, np.ones((2, 1), dtype=np.float32), start_offset=0, reset=True)
    # Past the limit (the longest valid chunk as JSON): 413, read no further.
    huge = json.dumps({"values": [0.5] * 300_000, "timesteps": 300_000}).encode()
    answer = requests.post(url(default_server, stream_id, "predict"), data=huge, timeout=TIMEOUT_S)
    assert answer.status_code == 413 and "body" in answer.json()["error"]
    assert answer.json()["code"] == "RESOURCE_EXHAUSTED"
    # A body cut short (the client promised more and closed): never a request.
    body = json.dumps({"values": [[0.5]], "start_offset": 2}).encode()
    path = f"/v1/streams/{quote(stream_id, safe='')}:predict"
    with socket.create_connection(("127.0.0.1", default_server.http_port), timeout=TIMEOUT_S) as connection:
        connection.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(body) + 10}\r\n\r\n".encode() + body)
        connection.shutdown(socket.SHUT_WR)
        assert b" 200 " not in connection.recv(4096)
    assert offset_over_grpc(default_server, stream_id) == 2
    assert "unexpected error in HTTP" not in default_server.log(), "a client's truncated body is not a server bug"
    assert requests.get(default_server.http_url + "/v2/health/live", timeout=TIMEOUT_S).status_code == 200
