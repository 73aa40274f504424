"""The KServe v2 / Triton protocol, `inference.GRPCInferenceService`: protobuf in, DataPlane, protobuf out.

The RPCs live here; converting messages to and from the server's types is server/api/triton_convert.py,
the counters behind ModelStatistics server/api/triton_statistics.py.

Triton's sequence parameters map onto streams (docs/triton.md says this for users):

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
from server.api.triton_convert import (
    MODEL_ALIAS,
    MODEL_VERSION,
    SERVER_NAME,
    model_config,
    model_metadata,
    to_chunk,
    to_response,
    to_stream_error,
)
from server.api.triton_statistics import TenantStatistics
from server.dataplane.plane import DataPlane
from server.errors import ServiceError, unknown_model
from server.types import Prediction, StageTimes
from server.version import server_version

EXTENSIONS = ("model_configuration", "sequence", "sequence(string_id)", "statistics")

Context = grpc.aio.ServicerContext


@dataclass(slots=True)
class _Submitted:
    """A request handed to the data plane: its answer, and what the response needs to know."""

    request: pb.ModelInferRequest
    answer: asyncio.Future[Prediction]
    batched: bool  # the input was [1, T, F], so the output gets the leading 1 too
    started_ns: int
    times: StageTimes  # filled in by the data path, for ModelStatistics
    tenant: str  # whose statistics count it


class TritonServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, dataplane: DataPlane, window: StreamWindow, *, max_batch_size: int, max_queue_delay_us: int,
        sequence_idle_us: int,
    ) -> None:
        self.dataplane = dataplane
        self.window = window
        self.max_batch_size = max_batch_size
        self.max_queue_delay_us = max_queue_delay_us
        self.sequence_idle_us = sequence_idle_us
        self.statistics = TenantStatistics()
        self.version = server_version()  # ServerMetadata's; the same as GetModel's and `lstm-serve --version`

    def _is_model(self, name: str, version: str) -> bool:
        return self._model_error(name, version) is None

    def _check_model(self, name: str, version: str) -> None:
        if error := self._model_error(name, version):
            raise error

    def _model_error(self, name: str, version: str) -> ServiceError | None:
        if name not in (self.dataplane.model.name, MODEL_ALIAS):
            return unknown_model(name)
        if version not in ("", MODEL_VERSION):
            return unknown_model(name, version)
        return None

    # The inference path, shared by ModelInfer and ModelStreamInfer.

    def _submit(self, request: pb.ModelInferRequest, time_remaining: float | None = None) -> _Submitted:
        """Validate and hand to the data plane now, so a stream's chunks reach the batcher in order."""
        self._check_model(request.model_name, request.model_version)
        started_ns, times, batched, tenant = time.monotonic_ns(), StageTimes(), False, TENANT.get()
        try:
            chunk, batched = to_chunk(
                request, self.dataplane.model, self.dataplane.max_chunk_timesteps, tenant, times
            )
            times.queued = time.monotonic_ns()
            answer = self.dataplane.submit(chunk, time_remaining)
        except Exception as exc:  # a bad request: its failure is delivered like the data plane's
            answer = asyncio.get_running_loop().create_future()
            answer.set_exception(as_service_error(exc))
        return _Submitted(request, answer, batched, started_ns, times, tenant)

    async def _finish(self, submitted: _Submitted) -> pb.ModelInferResponse:
        statistics = self.statistics.of(submitted.tenant)
        try:
            prediction = await submitted.answer
        except Exception:
            statistics.record_failure(submitted.started_ns)
            raise
        statistics.record_success(submitted.started_ns, submitted.times)
        return to_response(submitted.request, prediction, submitted.batched, self.dataplane.model.name)

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

        async for response in answer_in_order(requests, start, finish, to_stream_error, abandon, self.window):
            yield response

    # Health, metadata, configuration, statistics.

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

    @unary_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        self._check_model(request.name, request.version)
        return model_metadata(self.dataplane.model)

    @unary_errors
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        self._check_model(request.name, request.version)
        config = model_config(
            self.dataplane.model, self.dataplane.max_chunk_timesteps, max_batch_size=self.max_batch_size,
            max_queue_delay_us=self.max_queue_delay_us, sequence_idle_us=self.sequence_idle_us,
        )
        return pb.ModelConfigResponse(config=config)

    @unary_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        if request.name:  # empty: every model, which is this one
            self._check_model(request.name, request.version)
        # Under the name asked for, as Triton answers: perf_analyzer -m default looks its statistics up by it.
        name = request.name or self.dataplane.model.name
        # With API keys, the caller's tenant's own requests only (invariant 13).
        statistics = self.statistics.of(TENANT.get())
        return pb.ModelStatisticsResponse(model_stats=[statistics.message(name, MODEL_VERSION)])


def add_triton_service(
    server: grpc.aio.Server,
    dataplane: DataPlane,
    window: StreamWindow,
    *,
    max_batch_size: int,
    max_queue_delay_us: int,
    sequence_idle_us: int,
) -> str:
    """Serve the Triton protocol on `server` next to the native API; returns the full service name.

    The keyword arguments only feed what ModelConfig reports, and the caller passes the configuration's
    values (`--max-batch`, `--max-delay-ms`, `--state-ttl-s`): the defaults live in server/config.py alone.
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
