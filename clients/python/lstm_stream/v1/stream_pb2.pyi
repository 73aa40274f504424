from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("stream_id", "values", "timesteps", "start_offset", "reset", "end", "request_id", "model", "model_version")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    values: _containers.RepeatedScalarFieldContainer[float]
    timesteps: int
    start_offset: int
    reset: bool
    end: bool
    request_id: str
    model: str
    model_version: int
    def __init__(self, stream_id: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ..., timesteps: _Optional[int] = ..., start_offset: _Optional[int] = ..., reset: _Optional[bool] = ..., end: _Optional[bool] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("stream_id", "outputs", "timesteps", "output_size", "offset", "replayed", "request_id", "error", "model_version", "migration")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    outputs: _containers.RepeatedScalarFieldContainer[float]
    timesteps: int
    output_size: int
    offset: int
    replayed: bool
    request_id: str
    error: Error
    model_version: int
    migration: Migration
    def __init__(self, stream_id: _Optional[str] = ..., outputs: _Optional[_Iterable[float]] = ..., timesteps: _Optional[int] = ..., output_size: _Optional[int] = ..., offset: _Optional[int] = ..., replayed: _Optional[bool] = ..., request_id: _Optional[str] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., model_version: _Optional[int] = ..., migration: _Optional[_Union[Migration, _Mapping]] = ...) -> None: ...

class Migration(_message.Message):
    __slots__ = ("from_version", "policy", "history_start")
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    HISTORY_START_FIELD_NUMBER: _ClassVar[int]
    from_version: int
    policy: str
    history_start: int
    def __init__(self, from_version: _Optional[int] = ..., policy: _Optional[str] = ..., history_start: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("stream_id", "model")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    model: str
    def __init__(self, stream_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class ResetStreamResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class GetStreamRequest(_message.Message):
    __slots__ = ("stream_id", "model")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    model: str
    def __init__(self, stream_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class StreamInfo(_message.Message):
    __slots__ = ("stream_id", "exists", "offset", "updated_unix_ms", "expires_in_ms", "model_fingerprint", "model", "model_version")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    exists: bool
    offset: int
    updated_unix_ms: int
    expires_in_ms: int
    model_fingerprint: str
    model: str
    model_version: int
    def __init__(self, stream_id: _Optional[str] = ..., exists: _Optional[bool] = ..., offset: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ..., expires_in_ms: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("name", "fingerprint", "input_features", "output_size", "max_chunk_timesteps", "per_timestep_outputs", "recurrent_layers", "state_size", "server_version", "max_batch_chunks", "max_batch_timesteps", "version")
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
    VERSION_FIELD_NUMBER: _ClassVar[int]
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
    version: int
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., input_features: _Optional[int] = ..., output_size: _Optional[int] = ..., max_chunk_timesteps: _Optional[int] = ..., per_timestep_outputs: _Optional[bool] = ..., recurrent_layers: _Optional[_Iterable[_Union[RecurrentLayer, _Mapping]]] = ..., state_size: _Optional[int] = ..., server_version: _Optional[str] = ..., max_batch_chunks: _Optional[int] = ..., max_batch_timesteps: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersionStatus(_message.Message):
    __slots__ = ("name", "version", "state", "reason", "fingerprint")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    state: str
    reason: str
    fingerprint: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelVersionStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelVersionStatus, _Mapping]]] = ...) -> None: ...

class GetStreamStateRequest(_message.Message):
    __slots__ = ("stream_id", "model")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    model: str
    def __init__(self, stream_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class StateTensor(_message.Message):
    __slots__ = ("name", "shape", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class StreamState(_message.Message):
    __slots__ = ("stream_id", "model", "model_version", "offset", "tensors")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    model: str
    model_version: int
    offset: int
    tensors: _containers.RepeatedCompositeFieldContainer[StateTensor]
    def __init__(self, stream_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ..., offset: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[StateTensor, _Mapping]]] = ...) -> None: ...

class SetStreamStateResponse(_message.Message):
    __slots__ = ("offset", "model_version")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    offset: int
    model_version: int
    def __init__(self, offset: _Optional[int] = ..., model_version: _Optional[int] = ...) -> None: ...
