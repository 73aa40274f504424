"""One exception type for every failure a caller should see, carrying its gRPC status code.

The protocol edges map it in one place (a decorator for unary calls, an `error` field for streams);
the data path below them raises it and never imports protocol code.
"""

from __future__ import annotations

import grpc

OFFSET_METADATA_KEY = "x-stream-offset"


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, *, current_offset: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # Set on FAILED_PRECONDITION for an offset mismatch: the stream's offset now.
        self.current_offset = current_offset

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.current_offset is None:
            return ()
        return ((OFFSET_METADATA_KEY, str(self.current_offset)),)

    def __repr__(self) -> str:
        return f"ServiceError({self.code.name}, {self.message!r})"


def invalid_argument(field: str, problem: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}")


def offset_mismatch(stream_id: str, requested: int, current: int) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"stream {stream_id!r} is at offset {current}, but the chunk starts at offset {requested}; "
        f"resend from offset {current}, or send reset to start a new sequence",
        current_offset=current,
    )


def redis_unavailable(detail: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        f"state store (Redis) unreachable: {detail}; the chunk was not applied, retry it",
    )


def queue_full(limit: int) -> ServiceError:
    """Invariant 12 (docs/invariants.md): the batcher holds at most `limit` chunks; past that, refuse, not queue."""
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"server busy: {limit} chunks are already waiting for a batch (--max-queued-chunks); "
        "the chunk was not applied, retry it after a short wait",
    )


def malformed_message(problem: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid protobuf message for this method ({problem})"
    )
