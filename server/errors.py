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


# --- API keys and tenants (invariant 13, docs/invariants.md). No message ever carries a key. ---

def missing_api_key() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAUTHENTICATED,
        "this server needs an API key: send the metadata `authorization: Bearer <key>` with every call",
    )


def unknown_api_key() -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, "the API key in `authorization` is not known to this server")


def tenant_rate_exceeded(tenant: str, chunks_per_s: float) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"tenant {tenant!r} is over its limit of {chunks_per_s:g} chunks/s on this server; the chunk was not "
        "applied, send it again later",
    )


def tenant_streams_exceeded(tenant: str, max_streams: int) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"tenant {tenant!r} already has its limit of {max_streams} live streams; the chunk was not applied. "
        "End (`end`) or reset (ResetStream) streams it no longer uses, or wait until idle ones expire",
    )
