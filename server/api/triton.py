"""The KServe v2 / Triton protocol, `inference.GRPCInferenceService`: protobuf in, DataPlane, protobuf out.

Triton's sequence parameters map onto streams (README.md, "Coming from Triton", says this for users):

- `sequence_id` (int64, uint64 or string; 0 or "" means none) is the stream id. An integer id is the
  stream id of its decimal form, so native clients reach the slot of Triton sequence 42 as "42".
- `sequence_start` resets the slot before the request; `sequence_end` drops it after.
- A request that continues a sequence without state is refused (FAILED_PRECONDITION), Triton's rule
  that a sequence begins with START, unless it sets the parameter `implicit_sequence_start`.
- A request without a sequence is one-shot inference from zero state that saves nothing.
- With API keys, sequence ids live in the caller's tenant namespace, as native stream ids do
  (invariant 13, docs/invariants.md): the tenant comes from server/api/auth.py's TENANT.

The model is served under its Keras name and under the alias "default", version "1", with one input
"INPUT" (FP32 [timesteps, features], or [1, timesteps, features] as Triton's batched sequence models
take it) and one output "OUTPUT" (FP32 [rows, output_size], with the leading 1 when the input had it).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np

from lstm_stream.triton import grpc_service_pb2 as pb
from lstm_stream.triton import grpc_service_pb2_grpc as pb_grpc
from lstm_stream.triton import model_config_pb2 as config_pb
from server.api.auth import TENANT
from server.api.errors import as_service_error, unary_errors
from server.api.streaming import StreamWindow, answer_in_order
from server.api.wire import add_servicer
from server.dataplane import DataPlane
from server.errors import ServiceError, invalid_argument
from server.types import Chunk, Prediction
from server.validation import check_start, check_stream_id, check_values

INPUT_NAME = "INPUT"
OUTPUT_NAME = "OUTPUT"
DATATYPE = "FP32"
MODEL_VERSION = "1"
# Accepted besides the Keras model name, so one client script works whatever model a deployment runs.
MODEL_ALIAS = "default"
PLATFORM = "keras"
SERVER_NAME = "lstm-stream-server"
EXTENSIONS = ("model_configuration", "sequence", "sequence(string_id)", "statistics")

# Request parameters this server reads besides Triton's sequence_id / sequence_start / sequence_end.
IMPLICIT_START = "implicit_sequence_start"  # bool: continuing a sequence without state starts it
START_OFFSET = "start_offset"  # int64: apply only at this offset (exactly-once, as on the native API)
# Response parameters: the stream's offset after the request, and whether it was a replayed retry.
SEQUENCE_OFFSET = "sequence_offset"
REPLAYED = "replayed"

Context = grpc.aio.ServicerContext


def _server_version() -> str:
    try:
        return importlib.metadata.version("lstm-stream-server")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _unknown_model(name: str, version: str = "") -> ServiceError:
    # Triton's wording and code (NOT_FOUND), so clients that match on it keep working.
    what = f"'{name}'" + (f" version {version}" if version else "")
    return ServiceError(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: {what} is not found")


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


def _start_offset(parameters: Mapping[str, pb.InferParameter], reset: bool) -> int | None:
    field_name = f"parameters.{START_OFFSET}"
    if START_OFFSET not in parameters:
        return None
    parameter = parameters[START_OFFSET]
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise invalid_argument(field_name, f"is a {kind}; expected int64_param")
    value = int(getattr(parameter, kind))
    if value < 0:
        raise invalid_argument(field_name, f"is {value}; an offset is at least 0")
    check_start(value, reset, field_name)
    return value


@dataclass(slots=True)
class _Statistics:
    """Cheap counters for ModelStatistics: requests of this protocol in this server process since start."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    last_inference_ms: int = 0

    def record(self, ok: bool, started_ns: int) -> None:
        elapsed = time.monotonic_ns() - started_ns
        if ok:
            self.success_count += 1
            self.success_ns += elapsed
        else:
            self.fail_count += 1
            self.fail_ns += elapsed
        self.last_inference_ms = time.time_ns() // 1_000_000


@dataclass(slots=True)
class _Submitted:
    """A request handed to the data plane: its answer, and what the response needs to know."""

    request: pb.ModelInferRequest
    answer: asyncio.Future[Prediction]
    batched: bool = False  # the input was [1, T, F], so the output gets the leading 1 too
    started_ns: int = field(default_factory=time.monotonic_ns)


class TritonServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, dataplane: DataPlane, window: StreamWindow, *, max_batch_size: int = 1, max_queue_delay_us: int = 0,
        sequence_idle_us: int = 0,
    ) -> None:
        self.dataplane = dataplane
        self.window = window
        self.max_batch_size = max_batch_size
        self.max_queue_delay_us = max_queue_delay_us
        self.sequence_idle_us = sequence_idle_us
        self.statistics = _Statistics()
        self.version = _server_version()

    # --- model identity -------------------------------------------------------------------------

    def _is_model(self, name: str, version: str) -> bool:
        return self._model_error(name, version) is None

    def _check_model(self, name: str, version: str) -> None:
        if error := self._model_error(name, version):
            raise error

    def _model_error(self, name: str, version: str) -> ServiceError | None:
        if name not in (self.dataplane.model.name, MODEL_ALIAS):
            return _unknown_model(name)
        if version not in ("", MODEL_VERSION):
            return _unknown_model(name, version)
        return None

    # --- request -> Chunk ----------------------------------------------------------------------

    def _values(self, request: pb.ModelInferRequest) -> tuple[np.ndarray, bool]:
        """The input tensor as float32 [timesteps, features], and whether it came with a batch dimension."""
        features = self.dataplane.model.input_features
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
            if 0 < timesteps <= self.dataplane.max_chunk_timesteps and len(raw) != timesteps * features * 4:
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
            values, timesteps, features, self.dataplane.max_chunk_timesteps,
            values_field=values_field, timesteps_field="inputs[0].shape (timesteps)",
        )
        return array, batched

    @staticmethod
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

    def _chunk(self, request: pb.ModelInferRequest) -> tuple[Chunk, bool]:
        parameters = request.parameters
        stream_id = _sequence_id(parameters)
        reset = _bool_parameter(parameters, "sequence_start")
        end = _bool_parameter(parameters, "sequence_end")
        # Triton refuses a continuation of a sequence that never started; a client may opt out.
        implicit = _bool_parameter(parameters, IMPLICIT_START)
        start_offset = _start_offset(parameters, reset) if stream_id is not None else None
        self._check_outputs(request)
        values, batched = self._values(request)
        if stream_id is None:
            # Outside a sequence every request is its own whole sequence (Keras stateful=False).
            return Chunk(None, values, request_id=request.id, tenant=TENANT.get()), batched
        # The Triton `id` is only echoed, never used for retry detection: Triton clients often reuse
        # one id, and a repeated identical chunk must then run again, not be answered from storage.
        chunk = Chunk(stream_id, values, start_offset, reset, end, must_exist=not implicit, tenant=TENANT.get())
        return chunk, batched

    # --- Prediction -> response ----------------------------------------------------------------

    def _response(self, submitted: _Submitted, prediction: Prediction) -> pb.ModelInferResponse:
        request = submitted.request
        rows, columns = prediction.outputs.shape
        shape = [1, rows, columns] if submitted.batched else [rows, columns]
        response = pb.ModelInferResponse(
            model_name=self.dataplane.model.name,
            model_version=MODEL_VERSION,
            id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name=OUTPUT_NAME, datatype=DATATYPE, shape=shape)],
            raw_output_contents=[np.ascontiguousarray(prediction.outputs, dtype="<f4").tobytes()],
        )
        if prediction.stream_id is not None:
            response.parameters[SEQUENCE_OFFSET].int64_param = prediction.offset
            if prediction.replayed:
                response.parameters[REPLAYED].bool_param = True
        self._mark_final(request, response)
        return response

    @staticmethod
    def _mark_final(request: pb.ModelInferRequest, response: pb.ModelInferResponse) -> None:
        # Every response here is complete (the model is not decoupled): a client that asked Triton to
        # flag the final response gets the flag on it rather than waiting for an extra empty one.
        key = "triton_enable_empty_final_response"
        if key in request.parameters and request.parameters[key].bool_param:
            response.parameters["triton_final_response"].bool_param = True

    # --- the inference path, shared by ModelInfer and ModelStreamInfer ---------------------------

    def _submit(self, request: pb.ModelInferRequest, time_remaining: float | None = None) -> _Submitted:
        """Validate and hand to the data plane now, so a stream's chunks reach the batcher in order."""
        self._check_model(request.model_name, request.model_version)
        submitted = _Submitted(request, asyncio.get_running_loop().create_future())
        try:
            chunk, submitted.batched = self._chunk(request)
            submitted.answer = self.dataplane.submit(chunk, time_remaining)
        except Exception as exc:  # a bad request: its failure is delivered like the data plane's
            submitted.answer.set_exception(as_service_error(exc))
        return submitted

    async def _finish(self, submitted: _Submitted) -> pb.ModelInferResponse:
        try:
            prediction = await submitted.answer
        except Exception:
            self.statistics.record(False, submitted.started_ns)
            raise
        self.statistics.record(True, submitted.started_ns)
        return self._response(submitted, prediction)

    @unary_errors
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        return await self._finish(self._submit(request, context.time_remaining()))

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async def finish(submitted: _Submitted) -> pb.ModelStreamInferResponse:
            return pb.ModelStreamInferResponse(infer_response=await self._finish(submitted))

        def start(request: pb.ModelInferRequest) -> _Submitted:
            return self._submit(request, context.time_remaining())

        def abandon(unanswered: list[_Submitted]) -> None:
            self.dataplane.abandon([submitted.answer for submitted in unanswered])

        async for response in answer_in_order(requests, start, finish, self._stream_error, abandon, self.window):
            yield response

    def _stream_error(self, request: pb.ModelInferRequest, error: ServiceError) -> pb.ModelStreamInferResponse:
        # The stream carries no status code, so the message starts with it; the id lets clients match it.
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        )
        if error.current_offset is not None:
            response.parameters[SEQUENCE_OFFSET].int64_param = error.current_offset
        self._mark_final(request, response)
        return pb.ModelStreamInferResponse(error_message=f"{error.code.name}: {error.message}", infer_response=response)

    # --- health, metadata, configuration, statistics ---------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        # The service is registered only once the model is loaded and warmed up. Redis reachability is
        # reported by grpc.health.v1, which load balancers watch.
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        # Triton answers an unknown model with ready = false, not with an error.
        return pb.ModelReadyResponse(ready=self._is_model(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=EXTENSIONS)

    def _shapes(self) -> tuple[list[int], list[int]]:
        """Input and output dims without the batch dimension (-1: any number of timesteps)."""
        model = self.dataplane.model
        rows = -1 if model.per_timestep_outputs else 1
        return [-1, model.input_features], [rows, model.output_size]

    @unary_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        self._check_model(request.name, request.version)
        input_dims, output_dims = self._shapes()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.dataplane.model.name,
            versions=[MODEL_VERSION],
            platform=PLATFORM,
            # With max_batch_size > 0 Triton's metadata shapes lead with the batch dimension, -1.
            inputs=[tensor(name=INPUT_NAME, datatype=DATATYPE, shape=[-1, *input_dims])],
            outputs=[tensor(name=OUTPUT_NAME, datatype=DATATYPE, shape=[-1, *output_dims])],
        )

    @unary_errors
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        self._check_model(request.name, request.version)
        model = self.dataplane.model
        input_dims, output_dims = self._shapes()
        config = config_pb.ModelConfig(
            name=model.name,
            platform=PLATFORM,
            backend=SERVER_NAME,
            max_batch_size=self.max_batch_size,
            input=[config_pb.ModelInput(name=INPUT_NAME, data_type=config_pb.TYPE_FP32, dims=input_dims)],
            output=[config_pb.ModelOutput(name=OUTPUT_NAME, data_type=config_pb.TYPE_FP32, dims=output_dims)],
            sequence_batching=config_pb.ModelSequenceBatching(
                max_sequence_idle_microseconds=self.sequence_idle_us,
                oldest=config_pb.ModelSequenceBatching.StrategyOldest(
                    max_candidate_sequences=self.max_batch_size,
                    max_queue_delay_microseconds=self.max_queue_delay_us,
                    preserve_ordering=True,
                ),
            ),
        )
        for key, value in (
            ("fingerprint", model.fingerprint),
            ("max_chunk_timesteps", str(self.dataplane.max_chunk_timesteps)),
            ("per_timestep_outputs", str(model.per_timestep_outputs).lower()),
            ("state_size", str(model.state_size)),
        ):
            config.parameters[key].string_value = value
        return pb.ModelConfigResponse(config=config)

    @unary_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        if request.name:  # empty: every model, which is this one
            self._check_model(request.name, request.version)
        stats = self.statistics
        duration = pb.StatisticDuration
        return pb.ModelStatisticsResponse(
            model_stats=[
                pb.ModelStatistics(
                    name=self.dataplane.model.name,
                    version=MODEL_VERSION,
                    last_inference=stats.last_inference_ms,
                    inference_count=stats.success_count,
                    execution_count=stats.success_count,
                    inference_stats=pb.InferStatistics(
                        success=duration(count=stats.success_count, ns=stats.success_ns),
                        fail=duration(count=stats.fail_count, ns=stats.fail_ns),
                    ),
                )
            ]
        )


def add_triton_service(
    server: grpc.aio.Server,
    dataplane: DataPlane,
    window: StreamWindow,
    *,
    max_batch_size: int = 1,
    max_queue_delay_us: int = 0,
    sequence_idle_us: int = 0,
) -> str:
    """Serve the Triton protocol on `server` next to the native API; returns the full service name.

    The keyword arguments only feed what ModelConfig reports (the batcher's limits, the state TTL).
    """
    servicer = TritonServicer(
        dataplane,
        window,
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
        sequence_idle_us=sequence_idle_us,
    )
    add_servicer(pb_grpc.add_GRPCInferenceServiceServicer_to_server, servicer, server)
    return pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
