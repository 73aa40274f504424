"""The asyncio client: `AsyncClient` and its per-stream handle `AsyncStream` (the sync `Client` runs
this same code on a private event loop, so there is one implementation of every rule below).

Exactly-once, from the client's side (the server's rules are invariants 4, 9 and 11 of its
docs/invariants.md):

- Every chunk carries `start_offset` (where the handle believes the stream stands) and a `request_id`.
  The server applies a chunk only at that offset, and answers a repeat of one of its last applied
  chunks with its stored answer (`replayed`). So a chunk whose outcome is unknown (the server, its Redis or the
  network failed mid-call) is simply sent again, the same bytes, until an answer comes or the deadline
  passes: it is applied once, and its outputs reach the caller once.
- A FAILED_PRECONDITION answer means the server's stream is somewhere else (reset or advanced by
  someone else, expired, written by another model). Nothing is guessed: `StreamPositionError` says
  where the server stands; `resume()` continues there, `start_new()` starts over.

Pipelining (`pipe`, its state machine in pipe.py) keeps up to `window` chunks in flight on one
PredictStream call. When the call breaks (any status the transport or a proxy made, an answer that never
came, the call ending with chunks unanswered: pipe.py's docstring), the chunks not yet answered are
resent in order on a new call with their offsets and request ids. The server applies a stream's chunks
in order, so at the break it had applied a prefix of them, and it keeps the answers of its last K
applied chunks of each stream (`lstm-serve --replay-window K`, default 8): each of the prefix is
answered again (`replayed`), the rest are applied. So with a window up to K (the default window,
`defaults.PIPE_WINDOW`, equals the server's default K) every output reaches the caller exactly once,
whatever breaks. With a larger window, more than K chunks can be applied with their answers lost; the
server refuses the retry of the oldest as no longer kept (FAILED_PRECONDITION with its offset), the
client knows exactly which timesteps' outputs are gone, and raises `OutputsLost` (never a duplicate,
never a silent gap).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
import numpy as np

from lstm_stream.client import defaults
from lstm_stream.client.arrays import Chunks, as_input, join, outputs_of, pieces
from lstm_stream.client.errors import ClientError, RequestRejected, StreamPositionError, rejected
from lstm_stream.client.gateway import AsyncGateway
from lstm_stream.client.health_codec import decode_status, encode_request
from lstm_stream.client.pipe import Pipe, Position, StreamLane
from lstm_stream.client.retry import RetryPolicy, retry_async
from lstm_stream.client.types import (
    ModelInfo,
    Pem,
    StreamInfo,
    StreamState,
    call_metadata,
    channel_credentials,
    channel_options,
)
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc as pb_grpc


class AsyncClient:
    """A connection to one lstm-serve server (or a load balancer in front of replicas).

    target: "host:port". tls_ca: PEM (bytes or a path) of the CA that signed the server's certificate;
    with it (or with client_cert) the channel uses TLS. client_cert: (certificate chain, private key),
    PEM bytes or paths, for mutual TLS. api_key: sent with every call as `authorization: Bearer KEY`.
    deadline: seconds one operation (one chunk, with all its retries) may take; attempt_timeout: seconds
    one attempt may take before it is abandoned and retried. retry: a full `RetryPolicy` instead of the
    two. tls_server_name: the name to check in the server's certificate when it is not the target host.
    """

    def __init__(self, target: str = defaults.TARGET, *, tls_ca: Pem | None = None,
                 client_cert: tuple[Pem, Pem] | None = None, api_key: str | None = None,
                 deadline: float = defaults.DEADLINE_S, attempt_timeout: float = defaults.ATTEMPT_TIMEOUT_S,
                 retry: RetryPolicy | None = None,
                 tls_server_name: str | None = None, options: tuple[tuple[str, Any], ...] = ()) -> None:
        self.target = target
        self.retry = retry or RetryPolicy(deadline_s=deadline, attempt_timeout_s=min(attempt_timeout, deadline))
        credentials = channel_credentials(tls_ca, client_cert)
        opts = channel_options(tls_server_name, options)
        self._channel = (grpc.aio.insecure_channel(target, options=opts) if credentials is None
                         else grpc.aio.secure_channel(target, credentials, options=opts))
        self._stub = pb_grpc.StreamInferenceStub(self._channel)
        self._health = self._channel.unary_unary("/grpc.health.v1.Health/Check",
                                                 request_serializer=encode_request,
                                                 response_deserializer=decode_status)
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
            raise rejected(exc, self.target) from None

    def stream(self, stream_id: str) -> AsyncStream:
        """A handle on one stream. It starts at offset 0: the first chunk starts the stream unless the
        server already holds it elsewhere (then StreamPositionError; call resume() or start_new())."""
        return AsyncStream(self, stream_id)

    def gateway(self, *, max_message_timesteps: int = defaults.MESSAGE_TIMESTEPS) -> AsyncGateway:
        """Many streams' chunks per message on this connection: `send({stream_id: values, ...})` sends a
        tick in one PredictBatch message, `pipe(ticks)` pipelines ticks on one PredictBatchStream call
        (gateway.py). `max_message_timesteps`: the server's --max-batch-timesteps, if lowered."""
        return AsyncGateway(self, max_message_timesteps=max_message_timesteps)

    async def stream_info(self, stream_id: str) -> StreamInfo:
        return StreamInfo.from_proto(await self._call(self._stub.GetStream, pb.GetStreamRequest(stream_id=stream_id)))

    async def reset_stream(self, stream_id: str) -> bool:
        """Forget the stream's state (Keras reset_states() for it alone); True if it had any."""
        reply = await self._call(self._stub.ResetStream, pb.ResetStreamRequest(stream_id=stream_id))
        return bool(reply.existed)

    async def get_state(self, stream_id: str) -> StreamState:
        """The stream's recurrent state as named tensors, and its offset (GetStreamState). A stream without
        state (never started, ended, reset, expired) raises RequestRejected with NOT_FOUND."""
        return StreamState.from_proto(
            await self._call(self._stub.GetStreamState, pb.GetStreamStateRequest(stream_id=stream_id)))

    async def set_state(self, stream_id: str, state: StreamState, *, offset: int | None = None) -> int:
        """Replace the stream's state and offset in one atomic write (SetStreamState): its next chunk continues
        from them, at `offset` (default: the state's). Returns that offset. A state that does not fit the model
        raises RequestRejected (INVALID_ARGUMENT naming the field); nothing is changed then. Retried like the
        other calls: setting the same state twice is setting it once."""
        if offset is not None:
            state = replace(state, offset=offset)
        reply = await self._call(self._stub.SetStreamState, state.to_proto(stream_id))
        return int(reply.offset)

    async def _model_cached(self) -> ModelInfo:
        return self._model or await self.model()

    async def _call(self, method: Any, request: Any) -> Any:
        """One unary call with the retry policy; errors become the client's own."""
        async def attempt(timeout: float) -> Any:
            return await method(request, timeout=timeout, metadata=self._metadata)

        try:
            return await retry_async(attempt, self.retry)
        except grpc.aio.AioRpcError as exc:
            raise rejected(exc, self.target, self.retry.retryable) from None


class AsyncStream:
    """One stream, keeping its offset: the timesteps the server has consumed since the sequence began.

    Not for concurrent use: a stream's chunks are applied in order, one after another.
    """

    def __init__(self, client: AsyncClient, stream_id: str) -> None:
        self.client = client
        self.stream_id = stream_id
        self.position = Position()
        self._token = secrets.token_hex(6)

    @property
    def offset(self) -> int:
        """Timesteps the server has consumed since the sequence began, as far as this handle knows."""
        return self.position.offset

    @offset.setter
    def offset(self, offset: int) -> None:
        self.position = replace(self.position, offset=offset, new_sequence=False)

    def start_new(self) -> None:
        """The next chunk starts a new sequence at offset 0 (sent with `reset`, in the same request:
        atomic, and safe to retry)."""
        self.position = Position(0, self.position.sequence + 1, new_sequence=True)

    async def resume(self) -> int:
        """Continue where the server stands (after a restart of this program): returns the offset."""
        info = await self.info()
        self.offset = info.offset if info.exists else 0
        return self.offset

    async def info(self) -> StreamInfo:
        return await self.client.stream_info(self.stream_id)

    async def reset(self) -> bool:
        """Forget the stream's state now (ResetStream); the handle goes back to offset 0."""
        existed = await self.client.reset_stream(self.stream_id)
        self.position = Position(0, self.position.sequence + 1)
        return existed

    async def get_state(self) -> StreamState:
        """The stream's recurrent state and offset on the server (see `AsyncClient.get_state`)."""
        return await self.client.get_state(self.stream_id)

    async def set_state(self, state: StreamState, *, offset: int | None = None) -> int:
        """Set the stream's state on the server (see `AsyncClient.set_state`); the handle moves to its offset,
        and its next chunk continues from it."""
        at = await self.client.set_state(self.stream_id, state, offset=offset)
        self.position = Position(at, self.position.sequence + 1)  # request ids of a sequence of its own
        return at

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
        split = pieces(as_input(values, model), model.max_chunk_timesteps)
        outputs = []
        for number, piece in enumerate(split):
            last = number == len(split) - 1
            request = self._request(piece, self.position, end=end and last)
            try:
                response = await self.client._call(self.client._stub.Predict, request)
            except RequestRejected as exc:
                raise self._position_error(exc, self.offset) from None
            self._accept(response, request, self.position.after(request))
            outputs.append(outputs_of(response))
        return join(outputs, model)

    def _request(self, piece: np.ndarray, at: Position, *, end: bool, packed: bool = False) -> pb.PredictRequest:
        """The request for `piece` sent from position `at` (the handle's, or one planned ahead by a pipe).
        `packed`: its values travel in a PredictBatchRequest's block, not in the request."""
        request = pb.PredictRequest(stream_id=self.stream_id, timesteps=piece.shape[0], start_offset=at.offset,
                                    reset=at.new_sequence and at.offset == 0, end=end,
                                    request_id=f"{self._token}.{at.sequence}.{at.offset}")
        if not packed:
            # tolist(): protobuf takes a list of Python floats about 3 times faster than a NumPy array.
            request.values.extend(piece.reshape(-1).tolist())
        return request

    def _accept(self, response: pb.PredictResponse, request: pb.PredictRequest, after: Position) -> None:
        """Take the answer to `request`: the handle moves to `after` (`Position.after(request)`)."""
        expected = request.start_offset + request.timesteps
        if response.offset != expected:
            raise ClientError(f"stream {self.stream_id!r}: the server answered the chunk at offset "
                              f"{request.start_offset} with offset {response.offset}, expected {expected}")
        self.position = after

    def _position_error(self, exc: RequestRejected, start: int) -> ClientError:
        if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
            return exc
        return StreamPositionError(self.stream_id, start, exc.server_offset, exc.message)

    async def pipe(self, chunks: Chunks, *, window: int = defaults.PIPE_WINDOW) -> AsyncIterator[np.ndarray]:
        """Stream chunks over one PredictStream call with up to `window` unanswered at once; yields each
        chunk's outputs in order. A broken connection is reopened and the unanswered chunks resent by
        offset (see the module's docstring for what a window larger than the server's replay window risks)."""
        if window < 1:
            raise ValueError("window must be at least 1")
        client = self.client
        model = await client._model_cached()
        lane = StreamLane(self, model, client.target, client.retry.retryable)
        run: Pipe[np.ndarray] = Pipe(lane, window, client.retry,
                                     lambda: client._stub.PredictStream(metadata=client._metadata))
        async for outputs in run.outputs(chunks):
            yield outputs
