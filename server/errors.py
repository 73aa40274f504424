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


def replication_unconfirmed(confirmed: int | None, wanted: int, timeout_ms: int) -> ServiceError:
    """Redis WAIT came back short (or, with None, could not follow a write that was redirected to another
    cluster node): the write is on the master, which could still lose it in a failover."""
    why = (f"only {confirmed} of {wanted} replicas confirmed it within {timeout_ms} ms" if confirmed is not None
           else "its slot was moving between cluster nodes, so no replica confirmation was asked for")
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        f"the chunk was applied on the Redis master, but {why}, so it is not acknowledged; retry it with its "
        "start_offset: the retry replays the stored answer once replicas confirm it, or applies the chunk again "
        "if a failover lost it",
    )
