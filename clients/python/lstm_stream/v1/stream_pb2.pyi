from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("stream_id", "values", "timesteps", "start_offset", "reset", "end", "request_id")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    values: _containers.RepeatedScalarFieldContainer[float]
    timesteps: int
    start_offset: int
    reset: bool
    end: bool
    request_id: str
    def __init__(self, stream_id: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ..., timesteps: _Optional[int] = ..., start_offset: _Optional[int] = ..., reset: _Optional[bool] = ..., end: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("stream_id", "outputs", "timesteps", "output_size", "offset", "replayed", "request_id", "error")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    outputs: _containers.RepeatedScalarFieldContainer[float]
    timesteps: int
    output_size: int
    offset: int
    replayed: bool
    request_id: str
    error: Error
    def __init__(self, stream_id: _Optional[str] = ..., outputs: _Optional[_Iterable[float]] = ..., timesteps: _Optional[int] = ..., output_size: _Optional[int] = ..., offset: _Optional[int] = ..., replayed: _Optional[bool] = ..., request_id: _Optional[str] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class PredictBatchRequest(_message.Message):
    __slots__ = ("chunks", "values")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[PredictRequest]
    values: bytes
    def __init__(self, chunks: _Optional[_Iterable[_Union[PredictRequest, _Mapping]]] = ..., values: _Optional[bytes] = ...) -> None: ...

class PredictBatchResponse(_message.Message):
    __slots__ = ("results", "outputs", "error")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PredictResponse]
    outputs: bytes
    error: Error
    def __init__(self, results: _Optional[_Iterable[_Union[PredictResponse, _Mapping]]] = ..., outputs: _Optional[bytes] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class ResetStreamRequest(_message.Message):
    __slots__ = ("stream_id",)
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    def __init__(self, stream_id: _Optional[str] = ...) -> None: ...

class ResetStreamResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class GetStreamRequest(_message.Message):
    __slots__ = ("stream_id",)
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    def __init__(self, stream_id: _Optional[str] = ...) -> None: ...

class StreamInfo(_message.Message):
    __slots__ = ("stream_id", "exists", "offset", "updated_unix_ms", "expires_in_ms", "model_fingerprint")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    exists: bool
    offset: int
    updated_unix_ms: int
    expires_in_ms: int
    model_fingerprint: str
    def __init__(self, stream_id: _Optional[str] = ..., exists: _Optional[bool] = ..., offset: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ..., expires_in_ms: _Optional[int] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RecurrentLayer(_message.Message):
    __slots__ = ("name", "kind", "units")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    units: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., units: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "fingerprint", "input_features", "output_size", "max_chunk_timesteps", "per_timestep_outputs", "recurrent_layers", "state_size", "server_version", "max_batch_chunks", "max_batch_timesteps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    INPUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    PER_TIMESTEP_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    RECURRENT_LAYERS_FIELD_NUMBER: _ClassVar[int]
    STATE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: str
    input_features: int
    output_size: int
    max_chunk_timesteps: int
    per_timestep_outputs: bool
    recurrent_layers: _containers.RepeatedCompositeFieldContainer[RecurrentLayer]
    state_size: int
    server_version: str
    max_batch_chunks: int
    max_batch_timesteps: int
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., input_features: _Optional[int] = ..., output_size: _Optional[int] = ..., max_chunk_timesteps: _Optional[int] = ..., per_timestep_outputs: _Optional[bool] = ..., recurrent_layers: _Optional[_Iterable[_Union[RecurrentLayer, _Mapping]]] = ..., state_size: _Optional[int] = ..., server_version: _Optional[str] = ..., max_batch_chunks: _Optional[int] = ..., max_batch_timesteps: _Optional[int] = ...) -> None: ...
