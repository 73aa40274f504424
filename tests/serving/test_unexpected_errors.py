"""A bug in a servicer reaches the caller as INTERNAL naming the exception, over real gRPC, and is logged:
the one mapping of server/api/errors.py, for the case no request should ever produce."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from server.api.errors import as_service_error, unary_errors
from server.errors import ServiceError, invalid_argument

METHOD = "/test.Broken/Call"


class BrokenServicer:
    @unary_errors
    async def call(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"bad":
            raise invalid_argument("values", "must be finite")
        raise RuntimeError("a bug")


async def call_broken_server(request: bytes) -> grpc.aio.AioRpcError:
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(BrokenServicer().call)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Broken", {"Call": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary(METHOD)(request, timeout=10)
            return caught.value
    finally:
        await server.stop(None)


@pytest.mark.timeout(30)
def test_an_unexpected_exception_is_internal_and_logged(caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="server.api.errors"):
        error = asyncio.run(call_broken_server(b"anything"))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error: RuntimeError: a bug"
    assert any("unexpected error in call" in record.getMessage() for record in caplog.records)


@pytest.mark.timeout(30)
def test_a_service_error_keeps_its_own_status() -> None:
    error = asyncio.run(call_broken_server(b"bad"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "values" in error.details()


def test_a_stream_turns_an_unexpected_exception_into_internal(caplog) -> None:
    known = invalid_argument("values", "must be finite")
    assert as_service_error(known) is known
    with caplog.at_level(logging.ERROR, logger="server.api.errors"):
        unexpected = as_service_error(KeyError("slot"))
    assert isinstance(unexpected, ServiceError) and unexpected.code == grpc.StatusCode.INTERNAL
    assert unexpected.message == "internal error: KeyError: 'slot'"
    assert any("unexpected error in a stream" in record.getMessage() for record in caplog.records)
