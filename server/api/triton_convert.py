"""KServe v2 / Triton messages <-> the server's own types, as MLServer's converters: no RPCs, no state.

- `to_chunk`: a ModelInferRequest (tensor, datatype, shape, sequence parameters) -> a validated Chunk;
- `to_response` / `to_stream_error`: a Prediction or a ServiceError -> the protocol's answer;
- `model_metadata` / `model_config`: the ModelDescription as Triton clients read it.

The servicer (server/api/triton.py) calls these; what each parameter means is in its docstring.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from lstm_stream.triton import grpc_service_pb2 as pb
from lstm_stream.triton import model_config_pb2 as config_pb
from server.api.validation import check_start, check_stream_id, check_values
from server.errors import ServiceError, invalid_argument
from server.types import Chunk, ModelDescription, Prediction, StageTimes

INPUT_NAME = "INPUT"
OUTPUT_NAME = "OUTPUT"
DATATYPE = "FP32"
PLATFORM = "keras"
SERVER_NAME = "lstm-stream-server"

# Request parameters this server reads besides Triton's sequence_id / sequence_start / sequence_end.
IMPLICIT_START = "implicit_sequence_start"  # bool: continuing a sequence without state starts it
START_OFFSET = "start_offset"  # int64: apply only at this offset (exactly-once, as on the native API)
# Response parameters: the stream's offset after the request, and whether it was a replayed retry.
SEQUENCE_OFFSET = "sequence_offset"
REPLAYED = "replayed"
# Response parameters when the chunk moved its sequence off a retired version (--on-retired-version): how
# ("reset": a new sequence from zero state; "replay": its state rebuilt from its kept inputs), from which version
# (0: another model's slot), and for replay the offset its kept inputs started at (0: exact).
MIGRATION = "migration"
MIGRATED_FROM = "migrated_from_version"
HISTORY_START = "history_start"


# --- request parameters ----------------------------------------------------------------------------

def _bool_parameter(parameters: Mapping[str, pb.InferParameter], key: str) -> bool:
    """A bool request parameter; absent means False, another type is a client error worth naming."""
    if key not in parameters:
        return False
    parameter = parameters[key]
    kind = parameter.WhichOneof("parameter_choice")
    if kind == "bool_param":
        return parameter.bool_param
    if kind is None:
        return False
    raise invalid_argument(f"parameters.{key}", f"is a {kind}; expected bool_param")


def _sequence_id(parameters: Mapping[str, pb.InferParameter]) -> str | None:
    """The stream id named by `sequence_id`, or None for a request outside any sequence."""
    field_name = "parameters.sequence_id"
    if "sequence_id" not in parameters:
        return None
    parameter = parameters["sequence_id"]
    kind = parameter.WhichOneof("parameter_choice")
    if kind is None:
        return None
    if kind == "string_param":
        return check_stream_id(parameter.string_param, field_name) if parameter.string_param else None
    if kind in ("int64_param", "uint64_param"):
        value = int(getattr(parameter, kind))
        if value < 0:
            raise invalid_argument(field_name, f"is {value}; an integer sequence id must be positive (0: no sequence)")
        return str(value) if value else None
    raise invalid_argument(field_name, f"is a {kind}; expected int64_param, uint64_param or string_param")


def _count_parameter(parameters: Mapping[str, pb.InferParameter], key: str, unit: str) -> int | None:
    """An integer parameter that counts something (`unit` names it in errors): None when absent, else >= 0."""
    if key not in parameters:
        return None
    parameter = parameters[key]
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise invalid_argument(f"parameters.{key}", f"is a {kind}; expected int64_param ({unit})")
    value = int(getattr(parameter, kind))
    if value < 0:
        raise invalid_argument(f"parameters.{key}", f"is {value}; {unit} are at least 0")
    return value


def _start_offset(parameters: Mapping[str, pb.InferParameter], reset: bool) -> int | None:
    value = _count_parameter(parameters, START_OFFSET, "timesteps")
    if value is not None:
        check_start(value, reset, f"parameters.{START_OFFSET}")
    return value


def request_timeout_s(parameters: Mapping[str, pb.InferParameter]) -> float | None:
    """Triton's `timeout` parameter (microseconds; tritonclient's `infer(timeout=...)`), in seconds: the request's
    own deadline, at most the call's; None when absent or 0 (no limit of its own, as Triton reads 0)."""
    value = _count_parameter(parameters, "timeout", "microseconds")
    return value / 1e6 if value else None


# --- tensors -----------------------------------------------------------------------------------------

def _values(request: pb.ModelInferRequest, features: int, max_timesteps: int) -> tuple[np.ndarray, bool]:
    """The input tensor as float32 [timesteps, features], and whether it came with a batch dimension."""
    expected = f"[timesteps, {features}] or [1, timesteps, {features}]"
    if len(request.inputs) != 1:
        raise invalid_argument("inputs", f"has {len(request.inputs)} tensors; the model takes one, {INPUT_NAME!r}")
    tensor = request.inputs[0]
    if tensor.name != INPUT_NAME:
        raise invalid_argument("inputs[0].name", f"is {tensor.name!r}; the model's input is {INPUT_NAME!r}")
    if tensor.datatype != DATATYPE:
        raise invalid_argument("inputs[0].datatype", f"is {tensor.datatype!r}; the model's input is {DATATYPE}")
    shape = list(tensor.shape)
    batched = len(shape) == 3
    if batched and shape[0] != 1:
        raise invalid_argument(
            "inputs[0].shape",
            f"is {shape}; the batch dimension must be 1: a request carries one sequence "
            "(send each sequence in its own request; the server batches them)",
        )
    if len(shape) not in (2, 3) or shape[-1] != features:
        raise invalid_argument("inputs[0].shape", f"is {shape}; expected {expected}")
    timesteps = shape[-2]

    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise invalid_argument(
                "raw_input_contents", f"has {len(request.raw_input_contents)} entries; expected one per input (1)"
            )
        if tensor.HasField("contents"):
            raise invalid_argument("inputs[0].contents", "must be empty when raw_input_contents is used")
        raw = request.raw_input_contents[0]
        values_field = "raw_input_contents[0]"
        if 0 < timesteps <= max_timesteps and len(raw) != timesteps * features * 4:
            raise invalid_argument(
                values_field,
                f"has {len(raw)} bytes; expected timesteps x features x 4 bytes (FP32) = "
                f"{timesteps} x {features} x 4 = {timesteps * features * 4}",
            )
        if len(raw) % 4:
            raise invalid_argument(values_field, f"has {len(raw)} bytes, not a whole number of FP32 values")
        values = np.frombuffer(raw, dtype="<f4")
    else:
        other = [f.name for f, _ in tensor.contents.ListFields() if f.name != "fp32_contents"]
        if other:
            raise invalid_argument(
                "inputs[0].contents", f"sets {', '.join(other)}; FP32 data goes in fp32_contents"
            )
        values_field = "inputs[0].contents.fp32_contents"
        values = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
    array = check_values(
        values, timesteps, features, max_timesteps,
        values_field=values_field, timesteps_field="inputs[0].shape (timesteps)",
    )
    return array, batched


def _check_outputs(request: pb.ModelInferRequest) -> None:
    for index, output in enumerate(request.outputs):
        if output.name != OUTPUT_NAME:
            raise invalid_argument(
                f"outputs[{index}].name", f"is {output.name!r}; the model's only output is {OUTPUT_NAME!r}"
            )
        if "classification" in output.parameters:
            raise invalid_argument(
                f"outputs[{index}].parameters.classification", "is not supported; outputs are FP32 tensors"
            )


# --- request -> Chunk, Prediction -> response --------------------------------------------------------

def to_chunk(request: pb.ModelInferRequest, model: ModelDescription, max_timesteps: int, tenant: str,
             times: StageTimes | None = None, *, model_name: str = "", model_version: int = 0) -> tuple[Chunk, bool]:
    """The request as a validated Chunk, and whether its input had the batch dimension (the output gets it too).

    `times`, if given, travels with the chunk and collects its stage times (server/types.py)."""
    parameters = request.parameters
    stream_id = _sequence_id(parameters)
    reset = _bool_parameter(parameters, "sequence_start")
    end = _bool_parameter(parameters, "sequence_end")
    # Triton refuses a continuation of a sequence that never started; a client may opt out.
    implicit = _bool_parameter(parameters, IMPLICIT_START)
    start_offset = _start_offset(parameters, reset) if stream_id is not None else None
    _check_outputs(request)
    values, batched = _values(request, model.input_features, max_timesteps)
    if stream_id is None:
        # Outside a sequence every request is its own whole sequence (Keras stateful=False).
        return Chunk(None, values, request_id=request.id, tenant=tenant, times=times, model=model_name,
                     model_version=model_version), batched
    # The Triton `id` is only echoed, never used for retry detection: Triton clients often reuse
    # one id, and a repeated identical chunk must then run again, not be answered from storage.
    chunk = Chunk(stream_id, values, start_offset, reset, end, must_exist=not implicit, tenant=tenant, times=times,
                  model=model_name, model_version=model_version)
    return chunk, batched


def to_response(request: pb.ModelInferRequest, prediction: Prediction, batched: bool, model_name: str
                ) -> pb.ModelInferResponse:
    rows, columns = prediction.outputs.shape
    shape = [1, rows, columns] if batched else [rows, columns]
    response = pb.ModelInferResponse(
        model_name=model_name,
        model_version=str(prediction.model_version) if prediction.model_version else request.model_version,
        id=request.id,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name=OUTPUT_NAME, datatype=DATATYPE, shape=shape)],
        raw_output_contents=[np.ascontiguousarray(prediction.outputs, dtype="<f4").tobytes()],
    )
    if prediction.stream_id is not None:
        response.parameters[SEQUENCE_OFFSET].int64_param = prediction.offset
        if prediction.replayed:
            response.parameters[REPLAYED].bool_param = True
        if prediction.migration:
            response.parameters[MIGRATION].string_param = prediction.migration
            response.parameters[MIGRATED_FROM].int64_param = prediction.migrated_from
            if prediction.migration == "replay":
                response.parameters[HISTORY_START].int64_param = prediction.history_start
    _mark_final(request, response)
    return response


def to_stream_error(request: pb.ModelInferRequest, error: ServiceError) -> pb.ModelStreamInferResponse:
    # The stream carries no status code, so the message starts with it; the id lets clients match it.
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    if error.current_offset is not None:
        response.parameters[SEQUENCE_OFFSET].int64_param = error.current_offset
    _mark_final(request, response)
    return pb.ModelStreamInferResponse(error_message=f"{error.code.name}: {error.message}", infer_response=response)


def _mark_final(request: pb.ModelInferRequest, response: pb.ModelInferResponse) -> None:
    # Every response here is complete (the model is not decoupled): a client that asked Triton to
    # flag the final response gets the flag on it rather than waiting for an extra empty one.
    key = "triton_enable_empty_final_response"
    if key in request.parameters and request.parameters[key].bool_param:
        response.parameters["triton_final_response"].bool_param = True


# --- the model as Triton describes it -----------------------------------------------------------------

def _shapes(model: ModelDescription) -> tuple[list[int], list[int]]:
    """Input and output dims without the batch dimension (-1: any number of timesteps)."""
    rows = -1 if model.per_timestep_outputs else 1
    return [-1, model.input_features], [rows, model.output_size]


def model_metadata(name: str, versions: list[int], model: ModelDescription) -> pb.ModelMetadataResponse:
    input_dims, output_dims = _shapes(model)
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=name,
        versions=[str(v) for v in versions],
        platform=PLATFORM,
        # With max_batch_size > 0 Triton's metadata shapes lead with the batch dimension, -1.
        inputs=[tensor(name=INPUT_NAME, datatype=DATATYPE, shape=[-1, *input_dims])],
        outputs=[tensor(name=OUTPUT_NAME, datatype=DATATYPE, shape=[-1, *output_dims])],
    )


def model_config(
    name: str, model: ModelDescription, max_chunk_timesteps: int, *, max_batch_size: int, max_queue_delay_us: int,
    sequence_idle_us: int,
) -> config_pb.ModelConfig:
    input_dims, output_dims = _shapes(model)
    config = config_pb.ModelConfig(
        name=name,
        platform=PLATFORM,
        backend=SERVER_NAME,
        max_batch_size=max_batch_size,
        input=[config_pb.ModelInput(name=INPUT_NAME, data_type=config_pb.TYPE_FP32, dims=input_dims)],
        output=[config_pb.ModelOutput(name=OUTPUT_NAME, data_type=config_pb.TYPE_FP32, dims=output_dims)],
        sequence_batching=config_pb.ModelSequenceBatching(
            max_sequence_idle_microseconds=sequence_idle_us,
            oldest=config_pb.ModelSequenceBatching.StrategyOldest(
                max_candidate_sequences=max_batch_size,
                max_queue_delay_microseconds=max_queue_delay_us,
                preserve_ordering=True,
            ),
        ),
    )
    for key, value in (
        ("fingerprint", model.fingerprint),
        ("max_chunk_timesteps", str(max_chunk_timesteps)),
        ("per_timestep_outputs", str(model.per_timestep_outputs).lower()),
        ("state_size", str(model.state_size)),
    ):
        config.parameters[key].string_value = value
    return config
