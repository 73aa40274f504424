"""What every call passes through at the edge, whatever its service: metrics and the drain gate.

`EdgeInterceptor` wraps each method handler once (cached per method) and:
- counts every answer by protocol, method and gRPC code, and times it: a unary call once, a
  bidirectional stream once per message (paired with its request: one answer per request, in order),
  reading an error carried inside a stream message as that message's code;
- tracks calls in flight and open streams, so the shutdown knows when the accepted work is done;
- while the server drains (`Drain.refusing`), answers new calls UNAVAILABLE ("draining"), stops
  reading open streams, lets them answer what they had accepted, and ends them UNAVAILABLE.
Health and reflection pass untouched by the gate: a load balancer must read NOT_SERVING until the
port closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from lstm_stream.wire import status_from_number
from server import metrics
from server.errors import ServiceError, draining, stream_drained

_PROTOCOLS = {
    "lstm_stream.v1.StreamInference": "native",
    "inference.GRPCInferenceService": "triton",
    "grpc.health.v1.Health": "health",
    "grpc.reflection.v1alpha.ServerReflection": "reflection",
    "grpc.reflection.v1.ServerReflection": "reflection",
}
_UNGATED = {"health", "reflection"}
_CODES_BY_NAME = {code.name: code for code in grpc.StatusCode}


def _message_code(response: Any) -> grpc.StatusCode:
    """The outcome of one streamed answer: both protocols answer a failed request inside the stream."""
    error = getattr(response, "error", None)  # native PredictResponse.error {code, message}
    if error is not None and not isinstance(error, str):
        return status_from_number(error.code) if error.code else grpc.StatusCode.OK
    message = getattr(response, "error_message", "")  # Triton: "CODE_NAME: message"
    if message:
        return _CODES_BY_NAME.get(message.split(":", 1)[0], grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.OK


class Drain:
    """The shutdown's state as the edge sees it: refusing new work, and how much is still running."""

    def __init__(self) -> None:
        self.stopping = False  # SIGTERM came: health reads NOT_SERVING (HTTP's ready too), calls still served
        self.refusing = False
        self.calls = 0  # gated calls in flight (inference and streams; not health or reflection)
        self._idle = asyncio.Event()
        self._idle.set()
        self._readers: set[_StreamReader] = set()

    def announce(self) -> None:
        """The shutdown began: readiness turns false while calls are still served (the drain delay)."""
        self.stopping = True

    def refuse(self) -> None:
        """From now on new calls are refused and open streams stop reading (they finish and end)."""
        self.refusing = True
        for reader in list(self._readers):
            reader.stop()

    async def wait_idle(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._idle.wait()
        return self._idle.is_set()

    def enter(self) -> None:
        """A gated call starts (either protocol edge: gRPC here, HTTP in server/api/rest.py)."""
        self.calls += 1
        self._idle.clear()

    def leave(self) -> None:
        self.calls -= 1
        if self.calls == 0:
            self._idle.set()


class _StreamReader:
    """A stream's requests, until the drain stops reading them.

    No task per message: `__anext__` awaits the read directly. When the drain starts, a request that
    still arrives is not applied: the requests end there, as if the client had finished sending, and
    the servicer answers what it accepted and returns. A client that sends nothing more is not waited
    for: once it has had its answers and QUIET_S to send its next request, the blocked read is cancelled.
    The pause matters: a grpc.aio client that writes while the server's final status is arriving gets
    INTERNAL ("Internal error from Core") instead of that status, and a closed-loop client writes its
    next request the moment it reads an answer. Reading that request first ends the stream while the
    client is reading, not writing.
    """

    QUIET_S = 0.25

    def __init__(self, requests: AsyncIterator[Any], arrivals: deque[float]) -> None:
        self._requests = requests.__aiter__()
        self._arrivals = arrivals  # arrival times of requests not answered yet
        self._stopped = False
        self._cancelled = False
        self._waiting: asyncio.Task[Any] | None = None  # the task blocked in a read, if any
        self._last_answer = time.perf_counter()
        self._watcher: asyncio.Task[None] | None = None

    def __aiter__(self) -> _StreamReader:
        return self

    def answered(self) -> None:
        self._last_answer = time.perf_counter()

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._watcher = asyncio.get_running_loop().create_task(self._end_when_quiet())

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    async def _end_when_quiet(self) -> None:
        while not (self._waiting is not None and not self._arrivals
                   and time.perf_counter() - self._last_answer >= self.QUIET_S):
            await asyncio.sleep(0.05)
        self._cancelled = True
        self._waiting.cancel()

    async def __anext__(self) -> Any:
        if self._cancelled:
            raise StopAsyncIteration
        task = asyncio.current_task()
        self._waiting = task
        try:
            request = await self._requests.__anext__()
        except asyncio.CancelledError:
            if not self._cancelled or task is None:
                raise
            task.uncancel()  # our own cancel, for the drain: end the requests instead
            raise StopAsyncIteration from None
        finally:
            self._waiting = None
        if self._stopped:
            self._cancelled = True  # the read is over; the watcher has nothing left to cancel
            raise StopAsyncIteration  # arrived during the drain: not applied, the final status says so
        self._arrivals.append(time.perf_counter())
        return request


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, drain: Drain) -> None:
        self.drain = drain
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED itself
            return handler
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(details.method, handler)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, _, method = full_method.lstrip("/").rpartition("/")
        protocol = _PROTOCOLS.get(service, "other")
        gated = protocol not in _UNGATED
        codecs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, protocol, method, gated), **codecs)
        if handler.stream_stream and inspect.isasyncgenfunction(handler.stream_stream):
            return grpc.stream_stream_rpc_method_handler(
                self._stream(handler.stream_stream, protocol, method, gated), **codecs)
        # Health's Watch writes through its context until the client leaves: nothing to count per message,
        # and it must go on during the drain.
        return handler

    def _unary(self, behavior: Callable, protocol: str, method: str, gated: bool) -> Callable:
        drain = self.drain
        requests = metrics.REQUESTS
        seconds = metrics.REQUEST_SECONDS.labels(protocol, method)
        in_flight = metrics.IN_FLIGHT_CALLS.labels(protocol)

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            in_flight.inc()
            if gated:
                drain.enter()
            try:
                if gated and drain.refusing:
                    error = draining()
                    code = error.code
                    await context.abort(error.code, error.message)
                return await behavior(request, context)
            except grpc.aio.AbortError:
                code = context.code() or code
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                if gated:
                    drain.leave()
                in_flight.dec()
                requests.labels(protocol, method, code.name).inc()
                seconds.observe(time.perf_counter() - started)

        return call

    def _stream(self, behavior: Callable, protocol: str, method: str, gated: bool) -> Callable:
        drain = self.drain
        seconds = metrics.REQUEST_SECONDS.labels(protocol, method)
        ok = metrics.REQUESTS.labels(protocol, method, "OK")
        open_streams = metrics.OPEN_STREAMS.labels(protocol)
        in_flight = metrics.IN_FLIGHT_CALLS.labels(protocol)

        async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            code = grpc.StatusCode.OK
            arrivals: deque[float] = deque()
            reader = _StreamReader(requests, arrivals)
            open_streams.inc()
            in_flight.inc()
            if gated:
                drain.enter()
                drain._readers.add(reader)
            try:
                if gated and drain.refusing:
                    # Read the client's first request (not applied) before refusing, so its write is done
                    # when the status arrives (see _StreamReader: a write racing the status reads INTERNAL).
                    with contextlib.suppress(TimeoutError, StopAsyncIteration):
                        async with asyncio.timeout(_StreamReader.QUIET_S):
                            await requests.__aiter__().__anext__()
                    await _abort(context, draining())
                async for response in behavior(reader, context):
                    if arrivals:
                        seconds.observe(time.perf_counter() - arrivals.popleft())
                    reader.answered()
                    message_code = _message_code(response)
                    if message_code is grpc.StatusCode.OK:
                        ok.inc()
                    else:
                        metrics.REQUESTS.labels(protocol, method, message_code.name).inc()
                    yield response
                if gated and drain.refusing:
                    # Every accepted request was answered above; the rest were never read.
                    await _abort(context, stream_drained())
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                if gated:
                    reader.close()
                    drain._readers.discard(reader)
                    drain.leave()
                in_flight.dec()
                open_streams.dec()
                metrics.STREAMS.labels(protocol, method, code.name).inc()

        return call


async def _abort(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    await context.abort(error.code, error.message)
