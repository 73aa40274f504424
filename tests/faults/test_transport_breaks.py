"""Issue 24, item 10: a call ended by the transport or a proxy is a break to resume, not a chunk's answer.

Envoy resets the HTTP/2 streams of a replica that dies, and gRPC reports them as `INTERNAL: Stream
removed` / `Received RST_STREAM with error code 2`, with no trailing metadata. The server's own INTERNAL
(a bug) carries its message prefix `internal error: ` and its state-store errors carry `x-chunk-outcome`.
The rule lives once in lstm_stream.wire.is_transport_break; the client library (retry.py, pipe.py,
errors.py) and lstm-loadtest (transports.py) read it. In process, on real grpc.aio error objects; the
end-to-end kill through Envoy is tests/topologies/test_topology.py.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from loadtest.transports import ChunkFailed
from lstm_stream.client.errors import RequestRejected, ServerUnavailable, rejected
from lstm_stream.client.retry import RetryPolicy, is_break, retry_async
from lstm_stream.wire import OFFSET_METADATA_KEY, OUTCOME_METADATA_KEY, is_transport_break

pytestmark = pytest.mark.timeout(30)
S = grpc.StatusCode


def rpc_error(code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details)


BREAKS = [
    (S.INTERNAL, "Stream removed", ()),  # what the issue measured through Envoy
    (S.INTERNAL, "Received RST_STREAM with error code 2", ()),
    (S.UNKNOWN, "Stream removed", ()),
    (S.UNAVAILABLE, "Socket closed", ()),
    (S.UNAVAILABLE, "redis down", ((OUTCOME_METADATA_KEY, "not-applied"),)),
    (S.CANCELLED, "Received RST_STREAM with error code 8", ()),
]
ANSWERS = [
    (S.INTERNAL, "internal error: KeyError: 'x'", ()),  # the server's own bug (server/errors.py)
    (S.INTERNAL, "Stream removed", ((OUTCOME_METADATA_KEY, "unknown"),)),  # marked by the server
    (S.UNKNOWN, "odd", ((OFFSET_METADATA_KEY, "40"),)),
    (S.FAILED_PRECONDITION, "stream is at offset 40", ((OFFSET_METADATA_KEY, "40"),)),
    (S.INVALID_ARGUMENT, "values: NaN", ()),
    (S.UNAUTHENTICATED, "unknown key", ()),
]


@pytest.mark.parametrize(("code", "details", "trailing"), BREAKS)
def test_a_call_ended_by_the_transport_is_a_break(code, details, trailing) -> None:  # type: ignore[no-untyped-def]
    assert is_transport_break(code, details, trailing)
    error = rpc_error(code, details, trailing)
    assert is_break(error)
    assert ChunkFailed.from_rpc(error).transport_break
    assert isinstance(rejected(error, "t"), ServerUnavailable)  # retries ran out, not a refusal


@pytest.mark.parametrize(("code", "details", "trailing"), ANSWERS)
def test_the_servers_own_answers_are_not_breaks(code, details, trailing) -> None:  # type: ignore[no-untyped-def]
    assert not is_transport_break(code, details, trailing)
    error = rpc_error(code, details, trailing)
    assert not is_break(error)
    assert not ChunkFailed.from_rpc(error).transport_break
    assert isinstance(rejected(error, "t"), RequestRejected)


def test_a_break_is_retried_and_a_server_internal_is_not() -> None:
    """What lstm-loadtest and the client's unary calls do with them (the one retry loop)."""
    policy = RetryPolicy(deadline_s=10, attempt_timeout_s=1, initial_backoff_s=0.001)
    failures = [rpc_error(S.INTERNAL, "Stream removed"), ChunkFailed(S.INTERNAL, "Stream removed",
                                                                     transport_break=True)]

    async def broken_twice(timeout: float) -> str:
        if failures:
            raise failures.pop(0)
        return "answer"

    assert asyncio.run(retry_async(broken_twice, policy)) == "answer"

    calls = 0

    async def server_bug(timeout: float) -> str:
        nonlocal calls
        calls += 1
        raise rpc_error(S.INTERNAL, "internal error: ValueError: boom")

    with pytest.raises(grpc.aio.AioRpcError):
        asyncio.run(retry_async(server_bug, policy))
    assert calls == 1

    async def always_broken(timeout: float) -> str:
        nonlocal calls
        calls += 1
        raise rpc_error(S.INTERNAL, "Stream removed")

    # A policy that retries nothing retries no break either: a break counts as UNAVAILABLE.
    calls = 0
    with pytest.raises(grpc.aio.AioRpcError):
        asyncio.run(retry_async(always_broken, RetryPolicy(retryable=frozenset(), max_attempts=3)))
    assert calls == 1
