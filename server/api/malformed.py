"""Bytes that are not a valid message of the method's type get INVALID_ARGUMENT, never UNKNOWN.

grpc answers a request its deserializer cannot parse (corrupt wire format, a string field with bad
UTF-8) with UNKNOWN and logs a traceback. Here each of our services is registered with a deserializer
that returns a `Malformed` marker instead; a unary method answers it INVALID_ARGUMENT, and a stream
answers it with an error message like any other bad request and stays open (`answer_in_order`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from server.errors import malformed_message


class Malformed:
    """A request that did not parse; `empty` is a default message of the method's type."""

    __slots__ = ("empty", "problem", "size")

    def __init__(self, empty: Any, problem: str, size: int) -> None:
        self.empty = empty
        self.problem = problem
        self.size = size

    def ByteSize(self) -> int:  # the protobuf name answer_in_order calls
        return self.size


def _lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return Malformed(deserialize(b""), str(exc), len(data))

    return parse


def _guard_unary(behaviour: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]) -> Callable[..., Any]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            error = malformed_message(request.problem)
            await context.abort(error.code, error.message)
        return await behaviour(request, context)

    return guarded


class _Capture:
    """Stands in for the server while generated code registers a servicer, to keep its handlers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # rebuilt from the registered handlers below

    def add_registered_method_handlers(self, name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.services[name] = handlers


def add_servicer(add_to_server: Callable[[Any, Any], None], servicer: object, server: grpc.aio.Server) -> None:
    """`add_XServicer_to_server(servicer, server)`, with malformed requests answered INVALID_ARGUMENT."""
    capture = _Capture()
    add_to_server(servicer, capture)
    for name, handlers in capture.services.items():
        rewritten = {}
        for method, handler in handlers.items():
            handler = handler._replace(request_deserializer=_lenient(handler.request_deserializer))  # type: ignore[attr-defined]
            if handler.unary_unary is not None:
                handler = handler._replace(unary_unary=_guard_unary(handler.unary_unary))  # type: ignore[attr-defined]
            rewritten[method] = handler
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, rewritten),))
        server.add_registered_method_handlers(name, rewritten)
