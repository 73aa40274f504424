"""Python client of lstm-stream-server: exactly-once streaming made the default.

    from lstm_stream.client import Client

    with Client("127.0.0.1:50051") as client:
        stream = client.stream("sensor-42")
        for chunk in chunks:                      # numpy [timesteps, features], or 1-D for one feature
            outputs = stream.send(chunk)          # numpy [timesteps, outputs]

`AsyncClient` is the same API for asyncio. Every chunk carries its start offset and a request id and
is retried with jittered exponential backoff within the deadline, so it is applied once and answered
once; `pipe()` streams over one connection and resends unanswered chunks after a break. See aio.py's
docstring for the rules and errors.py for what each error means. `client.gateway()` sends many streams'
chunks per message, a tick at a time (`send`) or pipelined (`pipe`), with the same rules per stream
(gateway.py). `get_state()` and `set_state()` read and write a stream's recurrent state as named arrays
(`StreamState`), e.g. one computed offline by Keras. With a model repository,
`client.stream(id, model=..., version=...)` and `client.gateway(model=...)` name the model;
`client.models()`, `load_model()` and `unload_model()` manage its versions.
"""

from lstm_stream.client.aio import AsyncClient, AsyncStream
from lstm_stream.client.errors import (
    ChunksFailed,
    ClientError,
    InvalidInput,
    OutputsLost,
    RequestRejected,
    ServerUnavailable,
    StreamPositionError,
)
from lstm_stream.client.gateway import AsyncGateway, GatewayResult, Tick
from lstm_stream.client.retry import RETRYABLE, RetryPolicy
from lstm_stream.client.sync import Client, Gateway, Stream
from lstm_stream.client.types import Migration, ModelInfo, ModelVersionStatus, RecurrentLayer, StreamInfo, StreamState

__all__ = [
    "RETRYABLE",
    "AsyncClient",
    "AsyncGateway",
    "AsyncStream",
    "ChunksFailed",
    "Client",
    "ClientError",
    "Gateway",
    "GatewayResult",
    "InvalidInput",
    "Migration",
    "ModelInfo",
    "ModelVersionStatus",
    "OutputsLost",
    "RecurrentLayer",
    "RequestRejected",
    "RetryPolicy",
    "ServerUnavailable",
    "Stream",
    "StreamInfo",
    "StreamPositionError",
    "StreamState",
    "Tick",
]
