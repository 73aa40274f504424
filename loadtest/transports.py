"""How the load tester talks to the server: channels, the one GetModel before the load, and the two
transports a simulated sensor sends its chunks over (unary Predict, or one long-lived PredictStream).

A transport turns every failure into `ChunkFailed` with the gRPC status (or BAD_RESPONSE) and, for an
offset mismatch, the stream's offset on the server; the drivers (drivers.py) decide what to do with it.
A call ended by the transport or a proxy (lstm_stream.wire.is_transport_break: UNAVAILABLE, CANCELLED,
Envoy's `INTERNAL: Stream removed`, a PredictStream that ends with the chunk unanswered) is marked
`transport_break`: a break to resume, retried like UNAVAILABLE, never a chunk's own error.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from loadtest.config import LoadConfig
from lstm_stream.client.types import ModelInfo, call_metadata, channel_credentials
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc as pb_grpc
from lstm_stream.wire import is_transport_break, offset_from_metadata, status_from_number

BAD_RESPONSE = "BAD_RESPONSE"
_MESSAGE_LIMIT = 64 * 1024 * 1024
# A local subchannel pool gives every channel its own TCP connection; by default channels to one
# target share one, and "several channels" would still be one connection.
CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", _MESSAGE_LIMIT),
    ("grpc.max_send_message_length", _MESSAGE_LIMIT),
]


class ConnectError(RuntimeError):
    """The server could not be reached or described itself unusably (exit code 2)."""


def config_credentials(config: LoadConfig) -> grpc.ChannelCredentials | None:
    client_cert = (config.client_cert, config.client_key) if config.client_cert and config.client_key else None
    return channel_credentials(config.tls_ca, client_cert)  # type: ignore[arg-type]


def aio_channel(config: LoadConfig) -> grpc.aio.Channel:
    """One channel of the load: its own TCP connection (CHANNEL_OPTIONS), with TLS when configured."""
    credentials = config_credentials(config)
    if credentials is None:
        return grpc.aio.insecure_channel(config.target, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(config.target, credentials, options=CHANNEL_OPTIONS)


def fetch_model(target: str, timeout_s: float, config: LoadConfig | None = None) -> ModelInfo:
    """GetModel, with a blocking channel: the one call made before any event loop exists."""
    credentials = config_credentials(config) if config is not None else None
    metadata = call_metadata(config.api_key if config is not None else None)
    channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
    with channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
            request = pb.GetModelRequest(name=config.model_name if config is not None else "")
            info = pb_grpc.StreamInferenceStub(channel).GetModel(request, timeout=timeout_s, metadata=metadata)
        except grpc.FutureTimeoutError:
            raise ConnectError(f"no server answers at {target} (waited {timeout_s:g} s)") from None
        except grpc.RpcError as exc:
            raise ConnectError(f"GetModel at {target} failed: {exc.code().name}: {exc.details()}") from None
    return ModelInfo.from_proto(info)


class ChunkFailed(Exception):
    """A chunk's attempt failed. `transport_break`: the call ended without the server's answer (resume it:
    lstm_stream.client.retry.is_break reads this flag), as opposed to the chunk's own error."""

    def __init__(self, code: grpc.StatusCode | str, message: str, server_offset: int | None = None, *,
                 transport_break: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.server_offset = server_offset
        self.transport_break = transport_break

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError) -> ChunkFailed:
        """A call that ended with a status: the server's answer, or a break (judged by lstm_stream.wire)."""
        details, metadata = exc.details() or "", exc.trailing_metadata()
        return cls(exc.code(), details, offset_from_metadata(metadata),
                   transport_break=is_transport_break(exc.code(), details, metadata))

    @property
    def code_name(self) -> str:
        return self.code.name if isinstance(self.code, grpc.StatusCode) else self.code


class UnaryTransport:
    def __init__(self, stub: pb_grpc.StreamInferenceStub, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.stub = stub
        self.metadata = metadata

    async def send(self, request: pb.PredictRequest, timeout: float) -> pb.PredictResponse:
        try:
            return await self.stub.Predict(request, timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            raise ChunkFailed.from_rpc(exc) from None

    async def close(self) -> None:
        pass


class StreamTransport:
    """One long-lived PredictStream call, the way a sensor keeps its connection; reopened after a break."""

    def __init__(self, stub: pb_grpc.StreamInferenceStub, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.stub = stub
        self.metadata = metadata
        self.call: Any = None

    async def send(self, request: pb.PredictRequest, timeout: float) -> pb.PredictResponse:
        if self.call is None:
            self.call = self.stub.PredictStream(metadata=self.metadata)
        call = self.call
        try:
            async with asyncio.timeout(timeout):
                await call.write(request)
                response = await call.read()
        except TimeoutError:
            self._drop()
            raise ChunkFailed(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:g} s") from None
        except grpc.aio.AioRpcError as exc:
            self._drop()
            raise ChunkFailed.from_rpc(exc) from None
        except (grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            self._drop()
            raise ChunkFailed(grpc.StatusCode.UNAVAILABLE, f"stream broken: {exc}", transport_break=True) from None
        if response is grpc.aio.EOF:  # the call ended with this chunk unanswered: a break
            self._drop()
            raise ChunkFailed(grpc.StatusCode.UNAVAILABLE, "the server ended the stream", transport_break=True)
        if response.HasField("error"):
            code = status_from_number(response.error.code)
            offset = response.offset if code == grpc.StatusCode.FAILED_PRECONDITION else None
            raise ChunkFailed(code, response.error.message, offset)
        return response

    def _drop(self) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None

    async def close(self) -> None:
        call, self.call = self.call, None
        if call is None:
            return
        try:
            async with asyncio.timeout(2.0):
                await call.done_writing()
                await call.code()
        except (TimeoutError, grpc.aio.AioRpcError, grpc.aio.UsageError):
            call.cancel()
