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
- Models and versions (a server with `--model-repository`): a handle made with `stream(id, model=...,
  version=...)` names its model in every call (each model has its own namespace of stream ids) and the
  version a new sequence starts on; a sequence stays on the version that started it. When that version is
  retired and the server moves the stream with `--on-retired-version reset`, the answer says so
  (`migration`): the chunk started a new sequence from zero state, the answer's offset is authoritative,
  and the handle continues from it (a pipe's chunks already in flight are planned again from there and
  resent on a new call, as after a break).

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
from lstm_stream.client.triton_modules import triton_modules
from lstm_stream.client.types import (
    Migration,
    ModelInfo,
    ModelVersionStatus,
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
        self._triton: Any = None  # Triton's repository RPCs, on the same channel: made on first use
        self._health = self._channel.unary_unary("/grpc.health.v1.Health/Check",
                                                 request_serializer=encode_request,
                                                 response_deserializer=decode_status)
        self._metadata = call_metadata(api_key)
        self._models: dict[str, ModelInfo] = {}  # each model's newest version, by name ("": the only model)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def model(self, name: str = "", version: int = 0) -> ModelInfo:
        """A hosted model: features, outputs, limits, fingerprint, version (fetched again on every call).
        `name`: a model of the server's repository ("": the server's only model); `version`: 0 for the newest."""
        info = ModelInfo.from_proto(await self._call(self._stub.GetModel, pb.GetModelRequest(name=name,
                                                                                             version=version)))
        if not version:
            self._models[name] = info
        return info

    async def models(self) -> list[ModelVersionStatus]:
        """Every model version the server knows and where it stands (ListModels), by name and version."""
        reply = await self._call(self._stub.ListModels, pb.ListModelsRequest())
        return sorted((ModelVersionStatus.from_proto(row) for row in reply.models),
                      key=lambda row: (row.name, row.version))

    async def load_model(self, name: str) -> None:
        """Read the model's folder of the server's repository again and load what its version policy serves
        (Triton's RepositoryModelLoad; also brings back versions unloaded on request). A model that does not
        exist is NOT_FOUND; one whose versions all fail to load, INVALID_ARGUMENT with the reasons."""
        messages, triton = self._repository()
        await self._call(triton.RepositoryModelLoad, messages.RepositoryModelLoadRequest(model_name=name))

    async def unload_model(self, name: str, version: int = 0) -> None:
        """Retire one version of a model (0: every version) (Triton's RepositoryModelUnload): it drains,
        serving the sequences pinned to it and no new one, and is dropped `lstm-serve --version-drain-s` later."""
        messages, triton = self._repository()
        request = messages.RepositoryModelUnloadRequest(model_name=name)
        if version:
            request.parameters["version"].int64_param = version
        await self._call(triton.RepositoryModelUnload, request)

    def _repository(self) -> tuple[Any, Any]:
        """Triton's messages and a stub on this channel, imported only here and as this process can hold them
        (triton_modules.py), so an application that uses tritonclient too keeps working."""
        messages, stubs = triton_modules()
        if self._triton is None:
            self._triton = stubs.GRPCInferenceServiceStub(self._channel)
        return messages, self._triton

    async def health(self, service: str = "") -> str:
        """grpc.health.v1 status: "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN". One attempt;
        an unreachable server raises ServerUnavailable."""
        try:
            return await self._health(service, timeout=self.retry.attempt_timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise rejected(exc, self.target) from None

    def stream(self, stream_id: str, *, model: str = "", version: int = 0) -> AsyncStream:
        """A handle on one stream. It starts at offset 0: the first chunk starts the stream unless the
        server already holds it elsewhere (then StreamPositionError; call resume() or start_new()).
        `model`: the model the stream belongs to ("": the server's only model); `version`: the version its
        new sequences start on (0: the newest)."""
        return AsyncStream(self, stream_id, model=model, version=version)

    def gateway(self, *, max_message_timesteps: int = defaults.MESSAGE_TIMESTEPS, model: str = "",
                version: int = 0) -> AsyncGateway:
        """Many streams' chunks per message on this connection: `send({stream_id: values, ...})` sends a
        tick in one PredictBatch message, `pipe(ticks)` pipelines ticks on one PredictBatchStream call
        (gateway.py). `max_message_timesteps`: the server's --max-batch-timesteps, if lowered. `model`: the
        model all its streams belong to ("": the server's only model), `version` the one their new sequences
        start on (0: the newest)."""
        return AsyncGateway(self, max_message_timesteps=max_message_timesteps, model=model, version=version)

    async def stream_info(self, stream_id: str, *, model: str = "") -> StreamInfo:
        return StreamInfo.from_proto(await self._call(self._stub.GetStream,
                                                      pb.GetStreamRequest(stream_id=stream_id, model=model)))

    async def reset_stream(self, stream_id: str, *, model: str = "") -> bool:
        """Forget the stream's state (Keras reset_states() for it alone); True if it had any."""
        reply = await self._call(self._stub.ResetStream, pb.ResetStreamRequest(stream_id=stream_id, model=model))
        return bool(reply.existed)

    async def get_state(self, stream_id: str, *, model: str = "") -> StreamState:
        """The stream's recurrent state as named tensors, and its offset (GetStreamState); `model` as in
        `stream()`. A stream without state (never started, ended, reset, expired) raises RequestRejected with
        NOT_FOUND."""
        return StreamState.from_proto(await self._call(
            self._stub.GetStreamState, pb.GetStreamStateRequest(stream_id=stream_id, model=model)))

    async def set_state(self, stream_id: str, state: StreamState, *, offset: int | None = None,
                        model: str | None = None) -> int:
        """Replace the stream's state and offset in one atomic write (SetStreamState): its next chunk continues
        from them, at `offset` (default: the state's), on `model` (default: the state's). Returns that offset. A
        state that does not fit the model raises RequestRejected (INVALID_ARGUMENT naming the field); nothing is
        changed then. Retried like the other calls: setting the same state twice is setting it once."""
        if offset is not None:
            state = replace(state, offset=offset)
        if model is not None:
            state = replace(state, model=model)
        reply = await self._call(self._stub.SetStreamState, state.to_proto(stream_id))
        return int(reply.offset)

    async def _model_cached(self, model: str = "") -> ModelInfo:
        return self._models.get(model) or await self.model(model)

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

    `model` and `version`: the model every call names, and the version a new sequence starts on (0: the
    newest). After each chunk, `model_version` is the version that answered it and `migration` how the
    server moved the stream off a retired version for it (None: it did not).
    """

    def __init__(self, client: AsyncClient, stream_id: str, *, model: str = "", version: int = 0) -> None:
        self.client = client
        self.stream_id = stream_id
        self.model = model
        self.version = version
        self.position = Position()
        self.model_version = 0
        self.migration: Migration | None = None
        self._token = secrets.token_hex(6)
        # (sequence, version) of a sequence the server moved to another version: its chunks name that one.
        self._moved: tuple[int, int] | None = None

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
        return await self.client.stream_info(self.stream_id, model=self.model)

    async def reset(self) -> bool:
        """Forget the stream's state now (ResetStream); the handle goes back to offset 0."""
        existed = await self.client.reset_stream(self.stream_id, model=self.model)
        self.position = Position(0, self.position.sequence + 1)
        return existed

    async def get_state(self) -> StreamState:
        """The stream's recurrent state and offset on the server (see `AsyncClient.get_state`)."""
        return await self.client.get_state(self.stream_id, model=self.model)

    async def set_state(self, state: StreamState, *, offset: int | None = None) -> int:
        """Set the stream's state on the server (see `AsyncClient.set_state`); the handle moves to its offset,
        and its next chunk continues from it."""
        at = await self.client.set_state(self.stream_id, state, offset=offset, model=self.model)
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
        model = await self.client._model_cached(self.model)
        split = pieces(as_input(values, model), model.max_chunk_timesteps)
        outputs = []
        migration = None
        for number, piece in enumerate(split):
            last = number == len(split) - 1
            request = self._request(piece, self.position, end=end and last)
            try:
                response = await self.client._call(self.client._stub.Predict, request)
            except RequestRejected as exc:
                raise self._position_error(exc, self.offset) from None
            self._accept(response, request, self.position.after(request))
            migration = self.migration or migration
            outputs.append(outputs_of(response))
        self.migration = migration  # a split chunk's: any of its pieces'
        return join(outputs, model)

    def _request(self, piece: np.ndarray, at: Position, *, end: bool, packed: bool = False) -> pb.PredictRequest:
        """The request for `piece` sent from position `at` (the handle's, or one planned ahead by a pipe).
        `packed`: its values travel in a PredictBatchRequest's block, not in the request."""
        request = pb.PredictRequest(stream_id=self.stream_id, timesteps=piece.shape[0], start_offset=at.offset,
                                    reset=at.new_sequence and at.offset == 0, end=end,
                                    request_id=self._request_id(at), model=self.model,
                                    model_version=self._version_at(at))
        if not packed:
            # tolist(): protobuf takes a list of Python floats about 3 times faster than a NumPy array.
            request.values.extend(piece.reshape(-1).tolist())
        return request

    def _request_id(self, at: Position) -> str:
        return f"{self._token}.{at.sequence}.{at.offset}"

    def _version_at(self, at: Position) -> int:
        """The version a chunk sent from `at` names: the handle's, or the one the server moved its sequence to."""
        return self._moved[1] if self._moved is not None and self._moved[0] == at.sequence else self.version

    def _replanned(self, request: pb.PredictRequest, at: Position) -> pb.PredictRequest:
        """`request` (a pipe's, not yet answered) sent from `at` instead, after the server moved the stream."""
        moved = pb.PredictRequest()
        moved.CopyFrom(request)
        moved.start_offset, moved.reset, moved.request_id = at.offset, False, self._request_id(at)
        moved.model_version = self._version_at(at)
        return moved

    def _accept(self, response: pb.PredictResponse, request: pb.PredictRequest, after: Position) -> None:
        """Take the answer to `request`: the handle moves to `after` (`Position.after(request)`), or, when the
        server moved the stream off a retired version (`migration`), to the answer's offset in a new sequence."""
        self.migration = Migration.from_response(response)
        self.model_version = response.model_version
        if self.migration is not None:
            # The answer's offset is authoritative: with "reset" the chunk started a new sequence from zero (a new
            # sequence number, so no request id repeats); with an offset that goes on, the sequence goes on.
            sequence = after.sequence if response.offset == request.start_offset + request.timesteps \
                else after.sequence + 1
            self.position = after if request.end else Position(response.offset, sequence)
            self._moved = (self.position.sequence, response.model_version)
            return
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
        model = await client._model_cached(self.model)
        lane = StreamLane(self, model, client.target, client.retry.retryable)
        run: Pipe[np.ndarray] = Pipe(lane, window, client.retry,
                                     lambda: client._stub.PredictStream(metadata=client._metadata))
        async for outputs in run.outputs(chunks):
            yield outputs
