"""The comments of protos/ say what the server does: read from the .proto files and held against the
server's own constants and code, so a limit or a rule that changes cannot leave them behind."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from devkit import ROOT
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.wire import MAX_REQUEST_ID_CHARS, MAX_STREAM_ID_BYTES
from server.api.batch_convert import error_result
from server.api.validation import check_stream_id
from server.errors import ServiceError, invalid_argument, offset_mismatch

PROTO = ROOT / "protos" / "lstm_stream" / "v1" / "stream.proto"
TRITON_PROTO = ROOT / "protos" / "lstm_stream" / "triton" / "grpc_service.proto"


def field_comments(proto: Path = PROTO) -> dict[str, str]:
    """"Message.field" -> the comment lines just above the field, joined into one line."""
    comments: dict[str, str] = {}
    message, pending = "", []
    for line in proto.read_text().splitlines():
        text = line.strip()
        if start := re.match(r"message (\w+)", text):
            message, pending = start.group(1), []
        elif text.startswith("//"):
            pending.append(text.removeprefix("//").strip())
        elif field := re.match(r"(?:optional |repeated )?[\w.]+ (\w+) = \d+", text):
            comments[f"{message}.{field.group(1)}"] = " ".join(pending)
            pending = []
        else:
            pending = []
    return comments


COMMENTS = field_comments()


def test_the_stream_id_comment_states_the_servers_limit_and_rules() -> None:
    comment = COMMENTS["PredictRequest.stream_id"]
    assert f"1 to {MAX_STREAM_ID_BYTES} bytes" in comment, comment
    assert "without control characters" in comment and "spaces" in comment and "braces" in comment, comment
    # What the comment promises, the server's check does.
    for accepted in ("a b", "{braces}", "é" * (MAX_STREAM_ID_BYTES // 2), "x" * MAX_STREAM_ID_BYTES):
        assert check_stream_id(accepted) == accepted
    for refused in ("", "x" * (MAX_STREAM_ID_BYTES + 1), "bell\u0007"):
        with pytest.raises(ServiceError):
            check_stream_id(refused)


def test_the_request_id_comment_states_the_servers_limit() -> None:
    assert f"at most {MAX_REQUEST_ID_CHARS} characters" in COMMENTS["PredictRequest.request_id"]


def backticked(text: str) -> set[str]:
    return set(re.findall(r"`(\w+)`", text))


@pytest.mark.parametrize("error", [
    offset_mismatch("s", requested=3, current=10),
    invalid_argument("values", "has 2 values; expected 3"),
], ids=["offset-mismatch", "invalid-argument"])
def test_the_error_comment_names_the_fields_the_servicer_sets(error: ServiceError) -> None:
    comment = COMMENTS["PredictResponse.error"]
    echoed = re.search(r"With it, (.*?) echo the request", comment)
    unset = re.search(r"\(([^)]*) unset\)", comment)
    assert echoed and unset, comment
    request = pb.PredictRequest(stream_id="s", request_id="r-1", values=[1.0, 2.0], timesteps=1)
    response = error_result(request, error)
    set_fields = {descriptor.name for descriptor, _ in response.ListFields()}
    assert backticked(echoed.group(1)) == {"stream_id", "request_id"}
    assert all(getattr(response, name) == getattr(request, name) for name in backticked(echoed.group(1)))
    assert not set_fields & backticked(unset.group(1)), (set_fields, comment)
    assert response.error.code == error.code.value[0]
    # `offset` "as above": the current offset for a mismatch, 0 for any other error.
    assert "FAILED_PRECONDITION" in COMMENTS["PredictResponse.offset"]
    expected_offset = error.current_offset if error.code == grpc.StatusCode.FAILED_PRECONDITION else 0
    assert response.offset == expected_offset


def test_reset_and_get_stream_describe_existence_alike() -> None:
    cases = ("never seen", "ended", "reset", "expired")
    for name in ("ResetStreamResponse.existed", "StreamInfo.exists"):
        assert all(case in COMMENTS[name] for case in cases), (name, COMMENTS[name])
    assert "`end`" in COMMENTS["ResetStreamResponse.existed"]


def check_the_triton_stream_error_comment() -> None:
    """Run in a process of its own (tests/packaging/test_triton_proto_comment.py): the server's Triton messages
    and tritonclient's declare the same protobuf package, and one pytest process loads tritonclient's."""
    from lstm_stream.triton import grpc_service_pb2 as triton_pb
    from server.api.triton_convert import SEQUENCE_OFFSET, to_stream_error

    comment = field_comments(TRITON_PROTO)["ModelStreamInferResponse.error_message"]
    request = triton_pb.ModelInferRequest(model_name="sensor", model_version="1", id="r-1")
    response = to_stream_error(request, offset_mismatch("s", requested=3, current=10))
    assert '"<status name>: <message>"' in comment
    assert response.error_message.startswith("FAILED_PRECONDITION: "), response.error_message
    echoed = re.search(r"echoes the request's (.*?), holds no outputs", comment)
    assert echoed and backticked(echoed.group(1)) == {"model_name", "model_version", "id"}, comment
    assert all(getattr(response.infer_response, name) == getattr(request, name) for name in backticked(echoed.group(1)))
    assert not response.infer_response.outputs and not response.infer_response.raw_output_contents
    assert f"`{SEQUENCE_OFFSET}`" in comment
    assert response.infer_response.parameters[SEQUENCE_OFFSET].int64_param == 10
