"""Every error the client raises, named once. All derive from `ClientError`.

Which one tells the caller what to do next:

- `ServerUnavailable`: retries ran out within the deadline (the server, its Redis or the network was
  down all that time, or every call was ended by the transport or a proxy). Nothing was applied twice;
  resend later with the same handle (same offset).
- `StreamPositionError`: the server's stream is not where this handle expected it (FAILED_PRECONDITION).
  `server_offset` says where it stands; `resume()` continues from there, `start_new()` starts over.
- `OutputsLost`: a pipelined connection broke while more chunks were applied but unanswered than the
  server keeps answers for (its `--replay-window`); the state is right, but the answers of the oldest
  of them cannot be fetched again. Never raised for a window up to the server's.
- `RequestRejected`: the server refused the request for good (INVALID_ARGUMENT naming the field,
  UNAUTHENTICATED, PERMISSION_DENIED, DATA_LOSS, ...). Resending the same request cannot help.
- `InvalidInput`: refused before sending (wrong shape or feature count); also a `ValueError`.
- `ChunksFailed`: some streams of a gateway's tick failed (`GatewayResult.raise_for_errors()`); it holds
  each failed stream's own error (one of the above) and the other streams' outputs.
"""

from __future__ import annotations

from typing import Any

import grpc

from lstm_stream.client.retry import RETRYABLE
from lstm_stream.wire import is_transport_break, offset_from_metadata


class ClientError(Exception):
    """Base class. `code` is the gRPC status behind the error, when there was one."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class InvalidInput(ClientError, ValueError):
    """The values cannot be sent as they are (checked before any request)."""


class ServerUnavailable(ClientError):
    """Every attempt within the deadline failed with a retryable status."""


class RequestRejected(ClientError):
    """The server refused the request with a status that retrying cannot change. `server_offset` is the
    stream's offset when the server named it (trailing metadata `x-stream-offset`)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, server_offset: int | None = None) -> None:
        super().__init__(message, code)
        self.server_offset = server_offset


class StreamPositionError(ClientError):
    """The server's stream is at `server_offset`, not at `client_offset` where this handle's chunk starts.

    `server_offset` is None when the server did not say (e.g. the slot was written by another model).
    """

    def __init__(self, stream_id: str, client_offset: int, server_offset: int | None, detail: str) -> None:
        if server_offset is None:
            where = "the server cannot continue it"
            todo = "call start_new() to start a new sequence (or reset() to forget the stream)"
        else:
            where = f"the server's stream is at offset {server_offset}"
            todo = (f"call resume() to continue from offset {server_offset}, or start_new() to start a new "
                    "sequence from offset 0")
        super().__init__(
            f"stream {stream_id!r}: this handle sends from offset {client_offset}, but {where} ({detail}); {todo}",
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        self.stream_id = stream_id
        self.client_offset = client_offset
        self.server_offset = server_offset
        self.detail = detail


class OutputsLost(StreamPositionError):
    """A broken pipelined connection took the answers of applied chunks with it.

    The chunks covering timesteps [lost_from, lost_to) were applied once (the state is exact), but the
    server keeps the answers of only its last `--replay-window` applied chunks of a stream, and refused
    the retry of an older one as no longer kept, so their outputs cannot be fetched again. The handle
    now stands at `server_offset`; sending on continues the stream correctly. A `pipe()` window no
    larger than the server's replay window (the default window is) never loses an output.
    """

    def __init__(self, stream_id: str, lost_from: int, lost_to: int, server_offset: int) -> None:
        ClientError.__init__(
            self,
            f"stream {stream_id!r}: the connection broke while several pipelined chunks were in flight; the "
            f"chunks for timesteps {lost_from}..{lost_to - 1} were applied, but their answers were lost and "
            f"are no longer kept by the server (it keeps the answers of its last --replay-window chunks of a "
            f"stream). The stream is at offset {server_offset} and this handle continues from there; use a "
            f"window no larger than the server's replay window (window=1 is always safe) where every output "
            f"matters",
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        self.stream_id = stream_id
        self.client_offset = lost_from
        self.server_offset = server_offset
        self.detail = "answers lost with the connection"
        self.lost_from = lost_from
        self.lost_to = lost_to


class ChunksFailed(ClientError):
    """Some chunks of a gateway's tick failed. `errors` maps each failed stream to its own error (one of
    the classes above, which says what to do for that stream); `outputs` holds the other streams' outputs,
    delivered as usual. `code` is the failures' status when they share one."""

    def __init__(self, errors: dict[str, ClientError], outputs: dict[str, Any]) -> None:
        codes = {error.code for error in errors.values()}
        shown = "; ".join(str(error) for error in list(errors.values())[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        super().__init__(f"{len(errors)} of {len(errors) + len(outputs)} streams failed: {shown}{more}",
                         codes.pop() if len(codes) == 1 else None)
        self.errors = errors
        self.outputs = outputs


def rejected(exc: grpc.aio.AioRpcError, target: str, retryable: frozenset[grpc.StatusCode] = RETRYABLE) -> ClientError:
    """The client's error for a call that failed for good (a retryable status here means: retries ran out)."""
    code = exc.code()
    if code in retryable or is_transport_break(code, exc.details(), exc.trailing_metadata()):
        return ServerUnavailable(f"{target}: {code.name}: {exc.details()} (retries ran out within the deadline)", code)
    return RequestRejected(f"{code.name}: {exc.details()}", code, offset_from_metadata(exc.trailing_metadata()))
