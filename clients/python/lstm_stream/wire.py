"""The wire contract of the native API beyond the protobuf messages, in one place for all three sides.

The server (server/api, server/errors.py), the client (lstm_stream.client) and the load tester
(loadtest) import these names from here, so a metadata key, a limit or a status number means the same
on both ends of a call. It lives in the client distribution because the server depends on that
distribution and the client must not depend on the server. Only grpc is imported: no protobuf, no NumPy.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

# --- metadata keys --------------------------------------------------------------------------------

# Sent by the client with every call when an API key is configured: `authorization: Bearer KEY`.
AUTHORIZATION_KEY = "authorization"
BEARER_PREFIX = "Bearer "  # the server compares it case-insensitively
# Trailing metadata of a FAILED_PRECONDITION for an offset mismatch: where the stream stands now.
OFFSET_METADATA_KEY = "x-stream-offset"
# Trailing metadata of a chunk's state-store error: whether the chunk was applied (invariant 9).
OUTCOME_METADATA_KEY = "x-chunk-outcome"
NOT_APPLIED = "not-applied"
OUTCOME_UNKNOWN = "unknown"

# --- limits of a request --------------------------------------------------------------------------

# A stream id is UTF-8 text of 1 to MAX_STREAM_ID_BYTES bytes without control characters; the server
# checks it (server/api/validation.py), the load tester checks its own ids before connecting.
MAX_STREAM_ID_BYTES = 256
MAX_REQUEST_ID_CHARS = 256

# --- status codes as numbers ----------------------------------------------------------------------

# A PredictStream answer carries a failed chunk's status in `Error.code` as its number.
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_number(code: grpc.StatusCode) -> int:
    """The number `Error.code` carries for `code` (google.rpc.Code)."""
    return int(code.value[0])


def status_from_number(number: int) -> grpc.StatusCode:
    """The status an `Error.code` names; UNKNOWN for a number gRPC does not define."""
    return _STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def offset_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> int | None:
    """The stream's offset named by `x-stream-offset` in a call's trailing metadata, or None."""
    for key, value in metadata or ():
        if key == OFFSET_METADATA_KEY:
            try:
                return int(value)
            except ValueError:
                continue
    return None


# --- a call ended by the transport: a break to resume, not an answer ------------------------------

# Every error the server itself sends is a `ServiceError` (server/errors.py): a chunk's own error on a
# PredictStream travels in-band (`PredictResponse.error`, the call goes on), and a unary call's error
# ends it with a status. A server bug is INTERNAL with a message that begins with this prefix
# (server/errors.py `internal_error`); the server's state-store errors carry `x-chunk-outcome`.
SERVER_INTERNAL_PREFIX = "internal error: "
# Statuses that end a call whatever the server did: a dead replica, a reset connection, a proxy that gave
# up (Envoy resets the upstream HTTP/2 stream, and gRPC reports `INTERNAL: Stream removed` or
# `Received RST_STREAM with error code 2`). UNAVAILABLE and CANCELLED are always breaks (the client's
# own cancellations never reach it as a status: they surface as asyncio.CancelledError).
BREAK_STATUSES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
# INTERNAL and UNKNOWN are breaks unless the server marked them as its own (`is_server_error`).
MAYBE_BREAK_STATUSES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


def is_server_error(details: str | None, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """True when an INTERNAL/UNKNOWN status was sent by the server's own code: it carries the server's
    trailing metadata (`x-chunk-outcome` or `x-stream-offset`) or its message begins `internal error: `.
    A reset stream or a proxy's error carries neither."""
    if (details or "").startswith(SERVER_INTERNAL_PREFIX):
        return True
    return any(key in (OUTCOME_METADATA_KEY, OFFSET_METADATA_KEY) for key, _ in metadata or ())


def is_transport_break(code: grpc.StatusCode, details: str | None = None,
                       metadata: Iterable[tuple[str, str | bytes]] | None = None) -> bool:
    """Whether a call that ended with this status was ended by the transport or a proxy, not answered by
    the server: UNAVAILABLE, CANCELLED, or INTERNAL/UNKNOWN without the server's marks. Such a call is a
    break to resume: every chunk it carried was applied once or not at all (invariant 11), so the
    unanswered ones are resent in order, with their `start_offset` and `request_id`, on a new call."""
    if code in BREAK_STATUSES:
        return True
    return code in MAYBE_BREAK_STATUSES and not is_server_error(details, metadata)
