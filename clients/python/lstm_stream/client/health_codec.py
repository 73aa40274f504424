"""grpc.health.v1 messages, encoded and decoded by hand: the client does not depend on
grpcio-health-checking for one field each way.

    HealthCheckRequest  { string service = 1; }
    HealthCheckResponse { ServingStatus status = 1; }   // UNKNOWN, SERVING, NOT_SERVING, SERVICE_UNKNOWN
"""

from __future__ import annotations

HEALTH_STATUSES = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")
_SERVICE_TAG = 0x0A  # field 1, length-delimited
_STATUS_TAG = 0x08  # field 1, varint
_VARINT, _LENGTH_DELIMITED = 0, 2


def encode_request(service: str) -> bytes:
    """A HealthCheckRequest for `service` ("" for the server as a whole: the empty message)."""
    data = service.encode()
    return b"" if not data else bytes([_SERVICE_TAG]) + _varint(len(data)) + data


def decode_status(data: bytes) -> str:
    """The status name of a HealthCheckResponse; "UNKNOWN" when it has none this client knows."""
    position = 0
    while position < len(data):
        tag, position = _read_varint(data, position)
        if tag == _STATUS_TAG:
            value, _ = _read_varint(data, position)
            return HEALTH_STATUSES[value] if value < len(HEALTH_STATUSES) else "UNKNOWN"
        if tag & 7 == _VARINT:
            _, position = _read_varint(data, position)
        elif tag & 7 == _LENGTH_DELIMITED:
            length, position = _read_varint(data, position)
            position += length
        else:
            break
    return "UNKNOWN"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while position < len(data):
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return value, position
