"""The pieces of the wire contract the server, the client and the load tester share (lstm_stream.wire), and
the client's hand-written grpc.health.v1 codec, held against the real generated messages."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2

from lstm_stream.client.health_codec import HEALTH_STATUSES, decode_status, encode_request
from lstm_stream.wire import OFFSET_METADATA_KEY, offset_from_metadata, status_from_number, status_number


def test_every_status_round_trips_through_its_number() -> None:
    for code in grpc.StatusCode:
        assert status_from_number(status_number(code)) is code
    assert status_number(grpc.StatusCode.FAILED_PRECONDITION) == 9
    assert status_from_number(99) is grpc.StatusCode.UNKNOWN


@pytest.mark.parametrize(("metadata", "offset"), [
    (((OFFSET_METADATA_KEY, "42"),), 42),
    ((("x-chunk-outcome", "not-applied"), (OFFSET_METADATA_KEY, "7")), 7),
    (((OFFSET_METADATA_KEY, "not a number"), (OFFSET_METADATA_KEY, "3")), 3),
    ((("other", "1"),), None),
    ((), None),
    (None, None),
])
def test_the_offset_is_read_from_trailing_metadata(metadata: object, offset: int | None) -> None:
    assert offset_from_metadata(metadata) == offset  # type: ignore[arg-type]


@pytest.mark.parametrize("service", ["", "lstm_stream.v1.StreamInference", "é" * 200])
def test_the_health_request_encodes_as_protobuf_does(service: str) -> None:
    assert encode_request(service) == health_pb2.HealthCheckRequest(service=service).SerializeToString()


def test_the_health_status_decodes_as_protobuf_encodes_it() -> None:
    for number, name in enumerate(HEALTH_STATUSES):
        data = health_pb2.HealthCheckResponse(status=number).SerializeToString()
        assert decode_status(data) == name
    assert decode_status(b"") == "UNKNOWN"
