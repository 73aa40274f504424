"""Plain, typed answers of the client (no protobuf in the public API) and how a channel is made."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.wire import AUTHORIZATION_KEY, BEARER_PREFIX

# PEM given as bytes, or as a path to read.
Pem = bytes | str | Path
_MESSAGE_LIMIT = 64 * 1024 * 1024
# grpc's own reconnect backoff grows to 120 s by default; a client that retries within a deadline of
# seconds wants the channel to try again soon after a server comes back.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", _MESSAGE_LIMIT),
    ("grpc.max_send_message_length", _MESSAGE_LIMIT),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


@dataclass(frozen=True)
class RecurrentLayer:
    name: str
    kind: str  # "LSTM", "GRU" or "SimpleRNN"
    units: int


@dataclass(frozen=True)
class ModelInfo:
    """The hosted model (GetModel)."""

    name: str
    fingerprint: str
    input_features: int
    output_size: int
    max_chunk_timesteps: int
    per_timestep_outputs: bool  # False: one output row per chunk (its last step)
    recurrent_layers: tuple[RecurrentLayer, ...]
    state_size: int
    server_version: str = ""  # the answering replica's release; empty from 0.1.0
    max_batch_chunks: int = 0  # the most chunks one PredictBatch message may carry; 0 from 0.1.0 (no PredictBatch)
    max_batch_timesteps: int = 0  # the most timesteps one PredictBatch message may carry (all chunks together)
    version: int = 0  # the model version described (a repository's; 1 for `lstm-serve --model FILE`); 0 before 0.2.0

    @classmethod
    def from_proto(cls, message: pb.ModelInfo) -> ModelInfo:
        return cls(message.name, message.fingerprint, message.input_features, message.output_size,
                   message.max_chunk_timesteps, message.per_timestep_outputs,
                   tuple(RecurrentLayer(layer.name, layer.kind, layer.units) for layer in message.recurrent_layers),
                   message.state_size, message.server_version, message.max_batch_chunks,
                   message.max_batch_timesteps, message.version)


@dataclass(frozen=True)
class StreamInfo:
    """Where a stream stands on the server (GetStream)."""

    stream_id: str
    exists: bool
    offset: int
    updated_unix_ms: int
    expires_in_ms: int
    model_fingerprint: str
    model: str = ""  # the model whose stream this is (each model has its own namespace of stream ids)
    model_version: int = 0  # the version the stream's sequence runs on; 0: none this server knows

    @classmethod
    def from_proto(cls, message: pb.StreamInfo) -> StreamInfo:
        return cls(message.stream_id, message.exists, message.offset, message.updated_unix_ms,
                   message.expires_in_ms, message.model_fingerprint, message.model, message.model_version)


@dataclass(frozen=True)
class ModelVersionStatus:
    """One row of `models()` (ListModels): a model version the server knows, and whether it serves.

    state: "LOADING", "READY" (serves every sequence), "DRAINING" (retired: serves only the sequences pinned
    to it until `lstm-serve --version-drain-s` passes) or "UNAVAILABLE" (failed to load, or dropped); `reason`
    says why for the last two."""

    name: str
    version: int
    state: str
    reason: str = ""
    fingerprint: str = ""

    @classmethod
    def from_proto(cls, message: pb.ModelVersionStatus) -> ModelVersionStatus:
        return cls(message.name, message.version, message.state, message.reason, message.fingerprint)


@dataclass(frozen=True)
class Migration:
    """A chunk that moved its stream off a retired model version (`lstm-serve --on-retired-version`).

    policy "reset": the chunk started a new sequence from zero state on the answering version, so the stream's
    offset started again (the answer's offset is the chunk's timesteps); the handle follows it."""

    from_version: int
    policy: str

    @classmethod
    def from_response(cls, response: pb.PredictResponse) -> Migration | None:
        if not response.HasField("migration"):
            return None
        return cls(response.migration.from_version, response.migration.policy)


@dataclass(frozen=True)
class StreamState:
    """A stream's recurrent state (GetStreamState, SetStreamState): Keras `layer.states` of one stream.

    `tensors`: "<recurrent layer name>/<index>" -> float32 array of one stream's shape ([units], no batch
    axis), in the model's layer order, each layer's states in Keras order (LSTM: h, c; GRU and SimpleRNN:
    h). `offset`: the timesteps consumed since the sequence began; a set stream's next chunk starts there.
    `model` and `model_version`: the model the state belongs to ("" and 0 on a set: the server's only
    model, its newest version)."""

    offset: int
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict)
    model: str = ""
    model_version: int = 0

    @classmethod
    def from_proto(cls, message: pb.StreamState) -> StreamState:
        tensors = {t.name: np.asarray(t.values, dtype=np.float32).reshape(tuple(t.shape)) for t in message.tensors}
        return cls(message.offset, tensors, message.model, message.model_version)

    def to_proto(self, stream_id: str) -> pb.StreamState:
        tensors = []
        for name, values in self.tensors.items():
            array = np.asarray(values, dtype=np.float32)
            tensors.append(pb.StateTensor(name=name, shape=list(array.shape), values=array.reshape(-1).tolist()))
        return pb.StreamState(stream_id=stream_id, model=self.model, model_version=self.model_version,
                              offset=self.offset, tensors=tensors)


def _pem(value: Pem | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def channel_credentials(tls_ca: Pem | None, client_cert: tuple[Pem, Pem] | None) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for plaintext. `tls_ca` verifies the server (None with a client
    certificate: the system's roots); `client_cert` is (certificate chain, private key) for mutual TLS."""
    if tls_ca is None and client_cert is None:
        return None
    cert, key = (None, None) if client_cert is None else (_pem(client_cert[0]), _pem(client_cert[1]))
    return grpc.ssl_channel_credentials(root_certificates=_pem(tls_ca), private_key=key, certificate_chain=cert)


def call_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """Sent with every call. The key travels as `authorization: Bearer KEY`; on a plaintext channel
    anyone on the path can read it, so use TLS beyond loopback."""
    return () if not api_key else ((AUTHORIZATION_KEY, f"{BEARER_PREFIX}{api_key}"),)


def channel_options(tls_server_name: str | None,
                    extra: tuple[tuple[str, object], ...] = ()) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = list(CHANNEL_OPTIONS)
    if tls_server_name:
        # The name checked against the server's certificate, when it differs from the target's host.
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return options + list(extra)
