"""The asyncio client: `AsyncClient` and its per-stream handle `AsyncStream` (the sync `Client` runs
this same code on a private event loop, so there is one implementation of every rule below).

Exactly-once, from the client's side (the server's rules are invariants 4, 9 and 11 of its
docs/invariants.md):

- Every chunk carries `start_offset` (where the handle believes the stream stands) and a `request_id`.
  The server applies a chunk only at that offset, and answers a repeat of the last applied chunk with
  its stored answer (`replayed`). So a chunk whose outcome is unknown (the server, its Redis or the
  network failed mid-call) is simply sent again, the same bytes, until an answer comes or the deadline
  passes: it is applied once, and its outputs reach the caller once.
- A FAILED_PRECONDITION answer means the server's stream is somewhere else (reset or advanced by
  someone else, expired, written by another model). Nothing is guessed: `StreamPositionError` says
  where the server stands; `resume()` continues there, `start_new()` starts over.

Pipelining (`pipe`) keeps up to `window` chunks in flight on one PredictStream call. When the call
breaks, the chunks not yet answered are resent in order on a new call with their offsets. The server
applies a stream's chunks in order, so at the break it had applied a prefix of them; it can replay
only the last applied one. With window=1 (the default) that prefix is at most that one chunk, so every
output reaches the caller exactly once, whatever breaks. With a larger window, two or more chunks can
be applied with their answers lost; the client then sees a FAILED_PRECONDITION whose offset is the end
of a later unanswered chunk, knows exactly which timesteps' outputs are gone, and raises `OutputsLost`
(never a duplicate, never a silent gap). A larger window buys throughput on long round trips for the
risk of that error when a connection breaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from lstm_stream.client.errors import (
    ClientError,
    InvalidInput,
    OutputsLost,
    RequestRejected,
    ServerUnavailable,
    StreamPositionError,
)
from lstm_stream.client.retry import RETRYABLE, Budget, RetryPolicy, retry_async
from lstm_stream.client.types import (
    OFFSET_METADATA_KEY,
    ModelInfo,
    Pem,
    StreamInfo,
    call_metadata,
    channel_credentials,
    channel_options,
)
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
# A broken PredictStream call may surface as any of these besides the retryable statuses: all of them
# leave every unanswered chunk applied once or not at all (invariant 11), so the chunks are resent.
_STREAM_BREAKS = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_HEALTH = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")

Chunks = Iterable[Any] | AsyncIterable[Any]


class AsyncClient:
    """A connection to one lstm-serve server (or a load balancer in front of replicas).

    target: "host:port". tls_ca: PEM (bytes or a path) of the CA that signed the server's certificate;
    with it (or with client_cert) the channel uses TLS. client_cert: (certificate chain, private key),
    PEM bytes or paths, for mutual TLS. api_key: sent with every call as `authorization: Bearer KEY`.
    deadline: seconds one operation (one chunk, with all its retries) may take; attempt_timeout: seconds
    one attempt may take before it is abandoned and retried. retry: a full `RetryPolicy` instead of the
    two. tls_server_name: the name to check in the server's certificate when it is not the target host.
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, tls_ca: Pem | None = None,
                 client_cert: tuple[Pem, Pem] | None = None, api_key: str | None = None,
                 deadline: float = 60.0, attempt_timeout: float = 10.0, retry: RetryPolicy | None = None,
                 tls_server_name: str | None = None, options: tuple[tuple[str, Any], ...] = ()) -> None:
        self.target = target
        self.retry = retry or RetryPolicy(deadline_s=deadline, attempt_timeout_s=min(attempt_timeout, deadline))
        credentials = channel_credentials(tls_ca, client_cert)
        opts = channel_options(tls_server_name, options)
        self._channel = (grpc.aio.insecure_channel(target, options=opts) if credentials is None
                         else grpc.aio.secure_channel(target, credentials, options=opts))
        self._stub = pb_grpc.StreamInferenceStub(self._channel)
        self._health = self._channel.unary_unary("/grpc.health.v1.Health/Check",
                                                 request_serializer=_health_request,
                                                 response_deserializer=_health_status)
        self._metadata = call_metadata(api_key)
        self._model: ModelInfo | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def model(self) -> ModelInfo:
        """The hosted model: features, outputs, limits, fingerprint (fetched again on every call)."""
        self._model = ModelInfo.from_proto(await self._call(self._stub.GetModel, pb.GetModelRequest()))
        return self._model

    async def health(self, service: str = "") -> str:
        """grpc.health.v1 status: "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN". One attempt;
        an unreachable server raises ServerUnavailable."""
        try:
            return await self._health(service, timeout=self.retry.attempt_timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise _rejected(exc, self.target) from None

    def stream(self, stream_id: str) -> AsyncStream:
        """A handle on one stream. It starts at offset 0: the first chunk starts the stream unless the
        server already holds it elsewhere (then StreamPositionError; call resume() or start_new())."""
        return AsyncStream(self, stream_id)

    async def stream_info(self, stream_id: str) -> StreamInfo:
        return StreamInfo.from_proto(await self._call(self._stub.GetStream, pb.GetStreamRequest(stream_id=stream_id)))

    async def reset_stream(self, stream_id: str) -> bool:
        """Forget the stream's state (Keras reset_states() for it alone); True if it had any."""
        reply = await self._call(self._stub.ResetStream, pb.ResetStreamRequest(stream_id=stream_id))
        return bool(reply.existed)

    async def _model_cached(self) -> ModelInfo:
        return self._model or await self.model()

    async def _call(self, method: Any, request: Any) -> Any:
        """One unary call with the retry policy; errors become the client's own."""
        async def attempt(timeout: float) -> Any:
            return await method(request, timeout=timeout, metadata=self._metadata)

        try:
            return await retry_async(attempt, self.retry)
        except grpc.aio.AioRpcError as exc:
            raise _rejected(exc, self.target, self.retry.retryable) from None


class AsyncStream:
    """One stream, keeping its offset: the timesteps the server has consumed since the sequence began.

    Not for concurrent use: a stream's chunks are applied in order, one after another.
    """

    def __init__(self, client: AsyncClient, stream_id: str) -> None:
        self.client = client
        self.stream_id = stream_id
        self.offset = 0
        self._new_sequence = False  # the next chunk carries reset: start_new() was called
        self._token = secrets.token_hex(6)
        self._sequence = 0

    def start_new(self) -> None:
        """The next chunk starts a new sequence at offset 0 (sent with `reset`, in the same request:
        atomic, and safe to retry)."""
        self.offset = 0
        self._new_sequence = True
        self._sequence += 1

    async def resume(self) -> int:
        """Continue where the server stands (after a restart of this program): returns the offset."""
        info = await self.info()
        self.offset = info.offset if info.exists else 0
        self._new_sequence = False
        return self.offset

    async def info(self) -> StreamInfo:
        return await self.client.stream_info(self.stream_id)

    async def reset(self) -> bool:
        """Forget the stream's state now (ResetStream); the handle goes back to offset 0."""
        existed = await self.client.reset_stream(self.stream_id)
        self.offset = 0
        self._new_sequence = False
        self._sequence += 1
        return existed

    async def send(self, values: Any) -> np.ndarray:
        """Send one chunk `[timesteps, features]` (or 1-D for a one-feature model); returns its outputs
        `[timesteps, outputs]` (one row for a last-step model). Longer chunks than the server takes are
        split; retried within the deadline; a replayed answer counts as the answer. If a split chunk
        fails part-way, `offset` tells how much of it was applied."""
        return await self._send(values, end=False)

    async def end(self, values: Any = None) -> np.ndarray | None:
        """Finish the sequence: with values, send them as its last chunk (answered, then the state is
        dropped); without, drop the state now. The handle goes back to offset 0."""
        if values is None:
            await self.reset()
            return None
        return await self._send(values, end=True)

    async def _send(self, values: Any, *, end: bool) -> np.ndarray:
        model = await self.client._model_cached()
        pieces = _pieces(_as_input(values, model), model.max_chunk_timesteps)
        outputs = []
        for number, piece in enumerate(pieces):
            last = number == len(pieces) - 1
            request = self._request(piece, self.offset, end=end and last)
            try:
                response = await self.client._call(self.client._stub.Predict, request)
            except RequestRejected as exc:
                raise self._position_error(exc, self.offset) from None
            outputs.append(self._accept(response, request))
        return _join(outputs, model)

    def _request(self, piece: np.ndarray, start: int, *, end: bool) -> pb.PredictRequest:
        # tolist(): protobuf takes a list of Python floats about 3 times faster than a NumPy array.
        return pb.PredictRequest(stream_id=self.stream_id, values=piece.reshape(-1).tolist(),
                                 timesteps=piece.shape[0], start_offset=start,
                                 reset=self._new_sequence and start == 0, end=end,
                                 request_id=f"{self._token}.{self._sequence}.{start}")

    def _accept(self, response: pb.PredictResponse, request: pb.PredictRequest) -> np.ndarray:
        expected = request.start_offset + request.timesteps
        if response.offset != expected:
            raise ClientError(f"stream {self.stream_id!r}: the server answered the chunk at offset "
                              f"{request.start_offset} with offset {response.offset}, expected {expected}")
        self._new_sequence = False
        if request.end:
            self.offset = 0
            self._sequence += 1
        else:
            self.offset = expected
        return _outputs(response)

    def _position_error(self, exc: RequestRejected, start: int) -> ClientError:
        if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
            return exc
        return StreamPositionError(self.stream_id, start, exc.server_offset, exc.message)

    async def pipe(self, chunks: Chunks, *, window: int = 1) -> AsyncIterator[np.ndarray]:
        """Stream chunks over one PredictStream call with up to `window` unanswered at once; yields each
        chunk's outputs in order. A broken connection is reopened and the unanswered chunks resent by
        offset (see the module's docstring for what window > 1 risks)."""
        if window < 1:
            raise ValueError("window must be at least 1")
        model = await self.client._model_cached()
        run = _Pipe(self, model, window)
        async for outputs in run.outputs(chunks):
            yield outputs


@dataclass(eq=False)
class _Piece:
    """One request of a pipe: a caller's chunk, or part of one longer than the server's limit."""

    seq: int
    request: pb.PredictRequest
    last_of_chunk: bool
    first_sent: float | None = None
    sent_at: float | None = None
    sends: int = 0

    @property
    def start(self) -> int:
        return self.request.start_offset

    @property
    def end(self) -> int:
        return self.request.start_offset + self.request.timesteps


@dataclass(eq=False)
class _Pipe:
    stream: AsyncStream
    model: ModelInfo
    window: int
    pending: deque[_Piece] = field(default_factory=deque)  # sent or to send, unanswered, in order
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    source_done: bool = False
    source_error: BaseException | None = None
    next_seq: int = 0

    async def feed(self, chunks: Chunks, slots: asyncio.Semaphore) -> None:
        """Pull the caller's chunks only as window slots free up: read-ahead stays bounded."""
        stream = self.stream
        start = stream.offset
        try:
            async for chunk in _aiter(chunks):
                pieces = _pieces(_as_input(chunk, self.model), self.model.max_chunk_timesteps)
                for number, values in enumerate(pieces):
                    await slots.acquire()
                    piece = _Piece(self.next_seq, stream._request(values, start, end=False),
                                   last_of_chunk=number == len(pieces) - 1)
                    self.next_seq += 1
                    start = piece.end
                    async with self.changed:
                        self.pending.append(piece)
                        self.changed.notify_all()
        except Exception as exc:  # handed to the caller after the chunks before it are answered
            self.source_error = exc
        finally:
            async with self.changed:
                self.source_done = True
                self.changed.notify_all()

    def _has(self, seq: int) -> bool:
        return bool(self.pending) and self.pending[-1].seq >= seq

    def _writable(self, seq: int) -> bool:
        return self._has(seq) or self.source_done

    async def write(self, call: Any, from_seq: int) -> None:
        """Write pieces from `from_seq` on as they come; half-close once the source is exhausted."""
        seq = from_seq
        try:
            while True:
                async with self.changed:
                    await self.changed.wait_for(functools.partial(self._writable, seq))
                    piece = self.pending[seq - self.pending[0].seq] if self._has(seq) else None
                if piece is None:
                    await call.done_writing()
                    return
                now = time.monotonic()
                piece.sent_at = now
                piece.first_sent = piece.first_sent or now
                piece.sends += 1
                await call.write(piece.request)
                seq += 1
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            return  # the call broke: the reader sees why and reconnects

    async def outputs(self, chunks: Chunks) -> AsyncIterator[np.ndarray]:
        stream, client = self.stream, self.stream.client
        policy = client.retry
        slots = asyncio.Semaphore(self.window)
        feeder = asyncio.create_task(self.feed(chunks, slots))
        call: Any = None
        writer: asyncio.Task[None] | None = None
        head_budget: Budget | None = None
        parts: list[np.ndarray] = []
        try:
            while True:
                for piece in self.pending:
                    piece.sent_at = None  # to be resent on this call; its attempt's clock starts then
                call = client._stub.PredictStream(metadata=client._metadata)
                writer = asyncio.create_task(self.write(call, self.pending[0].seq if self.pending else self.next_seq))
                if head_budget is not None:
                    head_budget.attempt_timeout_s()
                broke: str | None = None
                while broke is None:
                    async with self.changed:
                        await self.changed.wait_for(lambda: bool(self.pending) or self.source_done)
                        head = self.pending[0] if self.pending else None
                    if head is None:
                        break  # everything answered and the source is done
                    if head_budget is None:
                        head_budget = Budget(policy)
                        head_budget.attempt_timeout_s()
                    if head.sent_at is None:
                        await asyncio.sleep(0)  # let the writer put it on the wire first
                    wait = (head.sent_at or time.monotonic()) + policy.attempt_timeout_s - time.monotonic()
                    try:
                        response = await asyncio.wait_for(call.read(), max(0.001, min(wait, head_budget.remaining_s())))
                    except TimeoutError:
                        broke = f"no answer within {policy.attempt_timeout_s:g} s"
                        continue
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() not in policy.retryable | _STREAM_BREAKS:
                            raise _rejected(exc, client.target) from None
                        broke = f"{exc.code().name}: {exc.details()}"
                        continue
                    if response is grpc.aio.EOF:
                        broke = "the server ended the call"
                        continue
                    if response.request_id != head.request.request_id:
                        raise ClientError(f"stream {stream.stream_id!r}: answer for request "
                                          f"{response.request_id!r} arrived where {head.request.request_id!r} "
                                          "was expected")
                    if response.HasField("error"):
                        broke = self._refused(head, response.error, response.offset)
                        continue
                    parts.append(stream._accept(response, head.request))
                    async with self.changed:
                        self.pending.popleft()
                        self.changed.notify_all()
                    slots.release()
                    head_budget = None
                    if head.last_of_chunk:
                        yield _join(parts, self.model)
                        parts = []
                if broke is None:
                    break
                await self._close(call, writer)
                call = writer = None
                pause = head_budget.next_wait_s() if head_budget is not None else 0.0
                if pause is None:
                    head = self.pending[0]
                    raise ServerUnavailable(
                        f"stream {stream.stream_id!r}: the chunk at offset {head.start} got no answer from "
                        f"{client.target} within the deadline ({head.sends} attempts); last: {broke}",
                        grpc.StatusCode.UNAVAILABLE)
                await asyncio.sleep(pause)
            await feeder
            if self.source_error is not None:
                raise self.source_error
            with contextlib.suppress(grpc.aio.AioRpcError):
                await asyncio.wait_for(call.code(), policy.attempt_timeout_s)
        finally:
            feeder.cancel()
            if call is not None:
                await self._close(call, writer)

    def _refused(self, head: _Piece, error: pb.Error, server_offset: int) -> str:
        """An in-band error for the oldest unanswered chunk: a reason to reconnect, or raised."""
        code = _CODES.get(error.code, grpc.StatusCode.UNKNOWN)
        stream = self.stream
        if code in stream.client.retry.retryable:
            return f"{code.name}: {error.message}"
        if code != grpc.StatusCode.FAILED_PRECONDITION:
            raise RequestRejected(f"stream {stream.stream_id!r}, chunk at offset {head.start}: {code.name}: "
                                  f"{error.message}", code)
        if head.sends > 1 and server_offset > head.start:
            # A resent chunk after a break: the server went on past it. Which unanswered chunk ends
            # where the server stands tells how many were applied with their answers lost.
            applied = [piece for piece in self.pending if piece.end == server_offset]
            if applied:
                stream.offset = server_offset
                raise OutputsLost(stream.stream_id, head.start, server_offset, server_offset)
        raise StreamPositionError(stream.stream_id, head.start, server_offset, error.message)

    @staticmethod
    async def _close(call: Any, writer: asyncio.Task[None] | None) -> None:
        call.cancel()
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer


def _rejected(exc: grpc.aio.AioRpcError, target: str, retryable: frozenset[grpc.StatusCode] = RETRYABLE) -> ClientError:
    """The client's error for a call that failed for good (a retryable status here means: retries ran out)."""
    code = exc.code()
    if code in retryable:
        return ServerUnavailable(f"{target}: {code.name}: {exc.details()} (retries ran out within the deadline)", code)
    server_offset = None
    for key, value in exc.trailing_metadata() or ():
        if key == OFFSET_METADATA_KEY:
            with contextlib.suppress(ValueError):
                server_offset = int(value)
    return RequestRejected(f"{code.name}: {exc.details()}", code, server_offset)


def _as_input(values: Any, model: ModelInfo) -> np.ndarray:
    x = np.asarray(values, dtype=np.float32)
    if x.ndim == 1 and model.input_features == 1:
        x = x.reshape(-1, 1)
    if x.ndim != 2 or x.shape[1] != model.input_features:
        raise InvalidInput(f"values: expected an array [timesteps, {model.input_features}]"
                           + (" (or 1-D)" if model.input_features == 1 else "") + f", got shape {x.shape}")
    if x.shape[0] == 0:
        raise InvalidInput("values: a chunk needs at least one timestep")
    return x


def _pieces(x: np.ndarray, limit: int) -> list[np.ndarray]:
    limit = limit or x.shape[0]
    return [x[start:start + limit] for start in range(0, x.shape[0], limit)]


def _outputs(response: pb.PredictResponse) -> np.ndarray:
    return np.asarray(response.outputs, dtype=np.float32).reshape(response.timesteps, response.output_size)


def _join(parts: list[np.ndarray], model: ModelInfo) -> np.ndarray:
    # A last-step model answers one row per request; a split chunk's answer is its last piece's row.
    return np.concatenate(parts) if model.per_timestep_outputs else parts[-1]


async def _aiter(chunks: Chunks) -> AsyncIterator[Any]:
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk


def _health_request(service: str) -> bytes:
    # grpc.health.v1.HealthCheckRequest {string service = 1}, encoded by hand: the client does not
    # depend on grpcio-health-checking for one field.
    data = service.encode()
    return b"" if not data else b"\x0a" + _varint(len(data)) + data


def _health_status(data: bytes) -> str:
    # HealthCheckResponse {ServingStatus status = 1}: find field 1 (varint).
    position = 0
    while position < len(data):
        tag, position = _read_varint(data, position)
        if tag == 0x08:
            value, _ = _read_varint(data, position)
            return _HEALTH[value] if value < len(_HEALTH) else "UNKNOWN"
        if tag & 7 == 0:
            _, position = _read_varint(data, position)
        elif tag & 7 == 2:
            length, position = _read_varint(data, position)
            position += length
        else:
            break
    return "UNKNOWN"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while position < len(data):
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return value, position
