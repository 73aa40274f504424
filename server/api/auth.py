"""API keys on every call of both protocols (invariant 13, docs/invariants.md): who is calling, as a tenant.

A grpc.aio server interceptor reads `authorization: Bearer <key>`, finds the key's tenant and puts it
in the `TENANT` contextvar. grpc.aio runs a call's interceptors and its handler in one Context, so
the servicers read the tenant at the protocol edge, into each Chunk and into ResetStream/GetStream;
below the edge the tenant is plain data. Health checking stays open (load balancers and probes carry
no keys); every other method, reflection and metadata included, needs a key. A missing or unknown key
is refused with UNAUTHENTICATED before the handler runs, for unary and streaming calls alike; the
key itself is never logged nor put into a message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any

import grpc

from lstm_stream.wire import AUTHORIZATION_KEY, BEARER_PREFIX
from server.errors import ServiceError, missing_api_key, unknown_api_key
from server.security.tenants import Tenants

# The calling tenant; "" on a server without API keys (then every stream lives in the one namespace).
TENANT: ContextVar[str] = ContextVar("lstm_serve_tenant", default="")

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
_SCHEME = BEARER_PREFIX.lower()


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The key from `authorization: Bearer <key>`, or None when there is none."""
    for key, value in metadata or ():
        if key == AUTHORIZATION_KEY and isinstance(value, str) and value[: len(_SCHEME)].lower() == _SCHEME:
            return value[len(_SCHEME) :].strip() or None
    return None


def _refusal(handler: grpc.RpcMethodHandler | None, error: ServiceError) -> grpc.RpcMethodHandler:
    """A handler of the same shape as the method's that answers only `error`."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(error.code, error.message)

    async def refuse_stream(_request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        await context.abort(error.code, error.message)
        yield  # unreachable; makes this an async generator, the shape a streaming response needs

    request_streaming = bool(handler and handler.request_streaming)
    response_streaming = bool(handler and handler.response_streaming)
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    return grpc.unary_unary_rpc_method_handler(refuse)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tenants: Tenants) -> None:
        self._tenants = tenants

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(OPEN_METHOD_PREFIXES):
            return await continuation(details)
        key = bearer_token(details.invocation_metadata)
        tenant = None if key is None else self._tenants.tenant_of(key)
        if tenant is None:
            error = missing_api_key() if key is None else unknown_api_key()
            return _refusal(await continuation(details), error)
        TENANT.set(tenant)
        return await continuation(details)
