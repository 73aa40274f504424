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


def draining() -> ServiceError:
    # UNAVAILABLE: clients and Envoy retry it, and the load balancer has already been told (health
    # NOT_SERVING) to send the next attempt to another replica.
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        "this replica is draining (shutting down); the request was not applied: retry it, another replica will "
        "answer",
    )


def stream_drained() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        "this replica is draining (shutting down): every chunk answered on this stream was applied, later ones "
        "were not; reopen the stream and resend from the last answered offset",
    )


def shutting_down() -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; the chunk was not applied, retry it")
