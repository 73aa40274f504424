"""API keys on every call of both protocols (invariant 13, docs/invariants.md): who is calling, as a tenant.

A grpc.aio server interceptor reads `authorization: Bearer <key>`, finds the key's tenant and puts it
in the `TENANT` contextvar. grpc.aio runs a call's interceptors and its handler in one Context, so
the servicers read the tenant at the protocol edge, into each Chunk and into ResetStream/GetStream;
below the edge the tenant is plain data. Health checking stays open (load balancers and probes carry
no keys); every other method, reflection and metadata included, needs a key. A missing or unknown key
is refused with UNAUTHENTICATED before the handler runs, for unary and streaming calls alike; the
key itself is never logged nor put into a message.

The REST port (server/api/rest.py) reads the same header, `Authorization: Bearer <key>`, with
`tenant_of_header`, and sets the same contextvar for the request; its health paths stay open too.

A stream outlives reloads of the key file (server/api/security.py), so its key is checked again: each
request it reads compares the key file's generation (server/security/tenants.py) with the one its key
was last checked under, one integer comparison, and only when a reload came in between is the key
looked up again. If it no longer gives the call's tenant (revoked, or moved to another tenant), the
request is not handed on and the call ends UNAUTHENTICATED; the requests read before it are answered.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc

from lstm_stream.wire import AUTHORIZATION_KEY, BEARER_PREFIX
from server.errors import ServiceError, api_key_withdrawn, missing_api_key, unknown_api_key
from server.security.tenants import Tenants

# The calling tenant; "" on a server without API keys (then every stream lives in the one namespace).
TENANT: ContextVar[str] = ContextVar("lstm_serve_tenant", default="")


@dataclass(frozen=True, slots=True)
class _Caller:
    """Who opened the call: its key (kept only in memory, to check it again after a reload), the tenant
    that key gave, and the key file's generation it was checked under."""

    key: str
    tenant: str
    generation: int

    def __repr__(self) -> str:  # never the key, whatever prints this
        return f"_Caller(tenant={self.tenant!r}, generation={self.generation})"


_CALLER: ContextVar[_Caller | None] = ContextVar("lstm_serve_caller", default=None)

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
_SCHEME = BEARER_PREFIX.lower()


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The key from `authorization: Bearer <key>`, or None when there is none."""
    for key, value in metadata or ():
        if key == AUTHORIZATION_KEY and isinstance(value, str) and value[: len(_SCHEME)].lower() == _SCHEME:
            return value[len(_SCHEME) :].strip() or None
    return None


def tenant_of_key(key: str | None, tenants: Tenants) -> str:
    """The tenant of a caller's key; UNAUTHENTICATED (ServiceError) when there is none or it is unknown."""
    tenant = None if key is None else tenants.tenant_of(key)
    if tenant is None:
        raise missing_api_key() if key is None else unknown_api_key()
    return tenant


def tenant_of_header(authorization: str | None, tenants: Tenants) -> str:
    """The tenant of an HTTP request's `Authorization: Bearer KEY` header, refused as the interceptor refuses a
    gRPC call (server/api/rest.py sets TENANT from it for the request)."""
    return tenant_of_key(bearer_token(None if authorization is None else [(AUTHORIZATION_KEY, authorization)]),
                         tenants)


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


class _KeyWithdrawn(Exception):
    """Raised by a stream's requests when its key no longer gives the call's tenant; ends the call."""


class _CheckedRequests:
    """A stream's requests, each handed on only while the call's key still gives the call's tenant.

    No task per message: `__anext__` awaits the read directly, then compares one integer."""

    __slots__ = ("_caller", "_generation", "_requests", "_tenants")

    def __init__(self, requests: AsyncIterator[Any], tenants: Tenants, caller: _Caller) -> None:
        self._requests = requests.__aiter__()
        self._tenants = tenants
        self._caller = caller
        self._generation = caller.generation

    def __aiter__(self) -> _CheckedRequests:
        return self

    async def __anext__(self) -> Any:
        request = await self._requests.__anext__()
        if self._tenants.generation != self._generation:  # the key file was reloaded since the last check
            self._generation = self._tenants.generation
            if self._tenants.tenant_of(self._caller.key) != self._caller.tenant:
                raise _KeyWithdrawn
        return request


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tenants: Tenants) -> None:
        self._tenants = tenants
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(OPEN_METHOD_PREFIXES):
            return await continuation(details)
        key = bearer_token(details.invocation_metadata)
        generation = self._tenants.generation
        try:
            tenant = tenant_of_key(key, self._tenants)
        except ServiceError as error:
            return _refusal(await continuation(details), error)
        assert key is not None  # a tenant was found for it
        TENANT.set(tenant)
        handler = await continuation(details)
        if handler is None or not (handler.stream_stream and inspect.isasyncgenfunction(handler.stream_stream)):
            return handler  # one request (or none to read): checked above, as the call started
        _CALLER.set(_Caller(key, tenant, generation))
        cached = self._guarded.get(details.method)
        if cached is None or cached[0] is not handler:  # one wrapper per method, as EdgeInterceptor caches
            cached = (handler, handler._replace(stream_stream=self._guard(handler.stream_stream)))  # type: ignore[attr-defined]
            self._guarded[details.method] = cached
        return cached[1]

    def _guard(self, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        tenants = self._tenants

        async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            caller = _CALLER.get()
            assert caller is not None  # set by intercept_service in this call's Context
            try:
                async for response in behavior(_CheckedRequests(requests, tenants, caller), context):
                    yield response
            except _KeyWithdrawn:
                error = api_key_withdrawn()
                await context.abort(error.code, error.message)

        return call
