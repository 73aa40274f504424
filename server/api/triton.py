"""The KServe v2 / Triton protocol, `inference.GRPCInferenceService`: protobuf in, DataPlane, protobuf out.

The RPCs live here; converting messages to and from the server's types is server/api/triton_convert.py,
the counters behind ModelStatistics server/api/triton_statistics.py. Each RPC is a line over a method that
needs no gRPC context (the caller's tenant and time left are passed in), so the REST edge (server/api/rest.py)
serves KServe v2 over HTTP through the same methods, the same rules and the same statistics.

Triton's sequence parameters map onto streams (docs/triton.md says this for users):

- `sequence_id` (int64, uint64 or string; 0 or "" means none) is the stream id. An integer id is the
  stream id of its decimal form, so native clients reach the slot of Triton sequence 42 as "42".
- `sequence_start` resets the slot before the request; `sequence_end` drops it after.
- A request that continues a sequence without state is refused (FAILED_PRECONDITION), Triton's rule
  that a sequence begins with START, unless it sets the parameter `implicit_sequence_start`.
- A request without a sequence is one-shot inference from zero state that saves nothing.
- With API keys, sequence ids live in the caller's tenant namespace, as native stream ids do
  (invariant 13, docs/invariants.md): the tenant comes from server/api/auth.py's TENANT.

Models and versions (docs/models.md): with `--model FILE` the model is served under its Keras name and under
the alias "default", version "1"; with `--model-repository` each model under its folder's name (the only
one also as "default"), its versions as the repository numbers them. `model_version` empty runs a new
sequence on the newest version; a sequence stays on the version that started it, which the response's
`model_version` names. The repository extension (RepositoryIndex, RepositoryModelLoad,
RepositoryModelUnload) reads and changes what is loaded. Each model has one input
"INPUT" (FP32 [timesteps, features], or [1, timesteps, features] as Triton's batched sequence models
take it) and one output "OUTPUT" (FP32 [rows, output_size], with the leading 1 when the input had it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from lstm_stream.triton import grpc_service_pb2 as pb
from lstm_stream.triton import grpc_service_pb2_grpc as pb_grpc
from server.api.auth import TENANT
from server.api.errors import as_service_error, unary_errors
from server.api.malformed import add_servicer
from server.api.streaming import StreamWindow, answer_in_order
from server.api.tracing import RequestTrace, Tracing, rpc_trace
from server.api.triton_convert import (
    SERVER_NAME,
    model_config,
    model_metadata,
    request_timeout_s,
    to_chunk,
    to_response,
    to_stream_error,
)
from server.api.triton_statistics import TenantStatistics
from server.dataplane.plane import DataPlane, ServedModel
from server.errors import ServiceError, invalid_argument, no_model_repository, unknown_model
from server.types import Prediction, StageTimes
from server.version import server_version

EXTENSIONS = ("model_configuration", "model_repository", "sequence", "sequence(string_id)", "statistics")

Context = grpc.aio.ServicerContext
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


@dataclass(slots=True)
class _Submitted:
    """A request handed to the data plane: its answer, and what the response needs to know."""

    request: pb.ModelInferRequest
    answer: asyncio.Future[Prediction]
    batched: bool  # the input was [1, T, F], so the output gets the leading 1 too
    started_ns: int
    times: StageTimes  # filled in by the data path, for ModelStatistics
    tenant: str  # whose statistics count it
    model: str  # the served model's name
    trace: RequestTrace | None = None  # with tracing on: the request's server span


class TritonServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, dataplane: DataPlane, window: StreamWindow, *, max_batch_size: int, max_queue_delay_us: int,
        sequence_idle_us: int, tracing: Tracing | None = None,
    ) -> None:
        """The keyword arguments only feed what ModelConfig reports, and the caller passes the configuration's
        values (`--max-batch`, `--max-delay-ms`, `--state-ttl-s`): the defaults live in server/config.py alone."""
        self.tracing = tracing  # None: tracing off
        self.dataplane = dataplane
        self.window = window
        self.max_batch_size = max_batch_size
        self.max_queue_delay_us = max_queue_delay_us
        self.sequence_idle_us = sequence_idle_us
        self.statistics = TenantStatistics()
        self.version = server_version()  # ServerMetadata's; the same as GetModel's and `lstm-serve --version`

    def _model(self, name: str, version: str) -> tuple[ServedModel, int]:
        """The model and version (0: none named) a request names; Triton's NOT_FOUND otherwise."""
        try:
            served = self.dataplane.served(name)
        except ServiceError:
            raise unknown_model(name) from None
        if not version:
            return served, 0
        number = int(version) if version.isascii() and version.isdigit() else 0
        if not number or served.versions.get(number) is None:
            raise unknown_model(name, version)
        return served, number

    def _is_model(self, name: str, version: str) -> bool:
        try:
            served, _ = self._model(name, version)
        except ServiceError:
            return False
        return bool(version) or served.versions.newest() is not None

    # The inference path, shared by ModelInfer and ModelStreamInfer.

    def _trace(self, context: Context, method: str) -> RequestTrace | None:
        return rpc_trace(self.tracing, context.invocation_metadata(), SERVICE, method)

    def _submit(self, request: pb.ModelInferRequest, tenant: str, time_remaining: float | None = None,
                trace: RequestTrace | None = None) -> _Submitted:
        """Validate and hand to the data plane now, so a stream's chunks reach the batcher in order."""
        try:
            served, version = self._model(request.model_name, request.model_version)
        except BaseException as exc:
            if trace is not None:
                trace.end(exc)
            raise
        started_ns, times, batched = time.monotonic_ns(), StageTimes(), False
        try:
            chunk, batched = to_chunk(
                request, served.description, self.dataplane.max_chunk_timesteps, tenant, times,
                model_name=served.name, model_version=version,
            )
            # Triton's `timeout` parameter shortens the call's deadline, over gRPC and HTTP alike.
            if (timeout_s := request_timeout_s(request.parameters)) is not None:
                time_remaining = timeout_s if time_remaining is None else min(time_remaining, timeout_s)
            times.queued = time.monotonic_ns()
            answer = self.dataplane.submit(chunk if trace is None else trace.chunk(chunk), time_remaining)
        except Exception as exc:  # a bad request: its failure is delivered like the data plane's
            answer = asyncio.get_running_loop().create_future()
            answer.set_exception(as_service_error(exc))
        return _Submitted(request, answer, batched, started_ns, times, tenant, served.name, trace)

    async def _finish(self, submitted: _Submitted) -> pb.ModelInferResponse:
        statistics = self.statistics.of(_statistics_key(submitted.tenant, submitted.model))
        try:
            if submitted.trace is not None:
                prediction = await submitted.trace.answer(submitted.answer)
            else:
                prediction = await submitted.answer
        except Exception:
            statistics.record_failure(submitted.started_ns)
            raise
        statistics.record_success(submitted.started_ns, submitted.times)
        return to_response(submitted.request, prediction, submitted.batched, submitted.model)

    async def infer(self, request: pb.ModelInferRequest, tenant: str, time_remaining: float | None = None,
                    trace: RequestTrace | None = None) -> pb.ModelInferResponse:
        """`trace`: the request's server span (server/api/tracing.py), None with tracing off."""
        return await self._finish(self._submit(request, tenant, time_remaining, trace))

    @unary_errors
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        return await self.infer(request, TENANT.get(), context.time_remaining(), self._trace(context, "ModelInfer"))

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async def finish(submitted: _Submitted) -> pb.ModelStreamInferResponse:
            return pb.ModelStreamInferResponse(infer_response=await self._finish(submitted))

        tenant = TENANT.get()  # set for the whole call by the API-key interceptor

        def start(request: pb.ModelInferRequest) -> _Submitted:
            return self._submit(request, tenant, context.time_remaining(), self._trace(context, "ModelStreamInfer"))

        def abandon(unanswered: list[_Submitted]) -> None:
            for submitted in unanswered:
                if submitted.trace is not None:
                    submitted.trace.end(asyncio.CancelledError())
            self.dataplane.abandon([submitted.answer for submitted in unanswered])

        async for response in answer_in_order(requests, start, finish, to_stream_error, abandon, self.window):
            yield response

    # Health, metadata, configuration, statistics: what each answers, then the RPCs over them.

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=EXTENSIONS)

    def model_ready(self, name: str, version: str) -> bool:
        # Triton answers an unknown model with ready = false, not with an error.
        return self._is_model(name, version)

    def model_metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        served, number = self._model(name, version)
        description = served.describe(number)[1]
        return model_metadata(served.name, [number] if number else served.versions.ready_numbers(), description)

    def model_config(self, name: str, version: str) -> pb.ModelConfigResponse:
        served, number = self._model(name, version)
        config = model_config(
            served.name, served.describe(number)[1], self.dataplane.max_chunk_timesteps,
            max_batch_size=self.max_batch_size,
            max_queue_delay_us=self.max_queue_delay_us, sequence_idle_us=self.sequence_idle_us,
        )
        return pb.ModelConfigResponse(config=config)

    def model_statistics(self, name: str, version: str, tenant: str) -> pb.ModelStatisticsResponse:
        if name:
            served, _ = self._model(name, version)
            # Under the name asked for, as Triton answers: perf_analyzer -m default looks its statistics up by it.
            named = [(name, served)]
        else:  # every model
            named = [(model, self.dataplane.served(model)) for model in self.dataplane.model_names()]
        # With API keys, the caller's tenant's own requests only (invariant 13).
        return pb.ModelStatisticsResponse(model_stats=[
            self.statistics.of(_statistics_key(tenant, served.name)).message(
                model, version or str(max(served.versions.ready_numbers(), default=0)))
            for model, served in named
        ])

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        # The service is registered only once the model is loaded and warmed up. Redis reachability is
        # reported by grpc.health.v1, which load balancers watch.
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.model_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return self.server_metadata()

    @unary_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        return self.model_metadata(request.name, request.version)

    @unary_errors
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        return self.model_config(request.name, request.version)

    @unary_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        return self.model_statistics(request.name, request.version, TENANT.get())

    # Triton's model repository extension.

    def repository_index(self, ready_only: bool) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[
            index(name=row.model, version=str(row.number), state=row.state, reason=row.reason)
            for row in self.dataplane.version_status() if not ready_only or row.state == "READY"
        ])

    async def repository_load(self, request: pb.RepositoryModelLoadRequest) -> None:
        if self.dataplane.control is None:
            raise no_model_repository()
        await self.dataplane.control.load(request.model_name)

    async def repository_unload(self, request: pb.RepositoryModelUnloadRequest) -> None:
        """Every version of the model, or the one named by the parameter `version`."""
        if self.dataplane.control is None:
            raise no_model_repository()
        version = 0
        if "version" in request.parameters:
            version = request.parameters["version"].int64_param
            if version < 1:
                raise invalid_argument("parameters.version", "must be an int64_param of at least 1")
        await self.dataplane.control.unload(request.model_name, version)

    @unary_errors
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context
                              ) -> pb.RepositoryIndexResponse:
        return self.repository_index(request.ready)

    @unary_errors
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: Context
                                  ) -> pb.RepositoryModelLoadResponse:
        await self.repository_load(request)
        return pb.RepositoryModelLoadResponse()

    @unary_errors
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: Context
                                    ) -> pb.RepositoryModelUnloadResponse:
        await self.repository_unload(request)
        return pb.RepositoryModelUnloadResponse()


def _statistics_key(tenant: str, model: str) -> str:
    return f"{tenant}\0{model}"  # neither a tenant name nor a model name has a NUL


def add_triton_service(server: grpc.aio.Server, servicer: TritonServicer) -> str:
    """Serve the Triton protocol on `server` next to the native API; returns the full service name."""
    add_servicer(pb_grpc.add_GRPCInferenceServiceServicer_to_server, servicer, server)
    return pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
