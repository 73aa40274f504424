"""The native API, `lstm_stream.v1.StreamInference`: protobuf in, DataPlane, protobuf out.

The unary RPCs are a line each over methods that need no gRPC context (tenant and time left passed in), which
the REST edge (server/api/rest.py) calls too: the native API as JSON has the same rules by construction."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import numpy as np

from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc as pb_grpc
from server.api.auth import TENANT
from server.api.batch_convert import (
    BatchLimits,
    batch_chunks,
    batch_response,
    error_result,
    refused_response,
    set_migration,
)
from server.api.errors import as_service_error, unary_errors
from server.api.state_convert import state_from_proto, state_to_proto
from server.api.streaming import StreamWindow, answer_in_order
from server.api.tracing import RequestTrace, Tracing, rpc_trace
from server.api.validation import check_stream_id, make_chunk
from server.dataplane.plane import DataPlane
from server.errors import ServiceError
from server.types import Chunk, Prediction
from server.version import server_version

SERVICE = pb.DESCRIPTOR.services_by_name["StreamInference"].full_name
# Per chunk of a PredictBatch message: its answer to come, or the error it was refused with at once.
BatchAnswers = list[asyncio.Future[Prediction] | ServiceError]


def _futures(messages: list[BatchAnswers]) -> list[asyncio.Future[Prediction]]:
    return [answer for answers in messages for answer in answers if not isinstance(answer, ServiceError)]


class StreamInferenceServicer(pb_grpc.StreamInferenceServicer):
    def __init__(self, dataplane: DataPlane, window: StreamWindow, batch_limits: BatchLimits,
                 tracing: Tracing | None = None) -> None:
        self.dataplane = dataplane
        self.window = window
        self.batch_limits = batch_limits
        self.tracing = tracing  # None: tracing off, and the calls below take their untraced path

    def _trace(self, context: grpc.aio.ServicerContext, method: str) -> RequestTrace | None:
        return rpc_trace(self.tracing, context.invocation_metadata(), SERVICE, method)

    def _chunk(self, request: pb.PredictRequest, tenant: str, trace: RequestTrace | None = None) -> Chunk:
        served = self.dataplane.served(request.model)
        chunk = make_chunk(
            stream_id=request.stream_id,
            values=np.asarray(request.values, dtype=np.float32),
            timesteps=request.timesteps,
            features=served.input_features,
            max_timesteps=self.dataplane.max_chunk_timesteps,
            model=served.name,
            model_version=request.model_version,
            start_offset=request.start_offset if request.HasField("start_offset") else None,
            reset=request.reset,
            end=request.end,
            request_id=request.request_id,
            tenant=tenant,
        )
        return chunk if trace is None else trace.chunk(chunk)

    def _shapes(self, name: str) -> tuple[str, int]:
        served = self.dataplane.served(name)
        return served.name, served.input_features

    @staticmethod
    def _response(prediction: Prediction) -> pb.PredictResponse:
        rows, columns = prediction.outputs.shape
        response = pb.PredictResponse(
            stream_id=prediction.stream_id or "",
            outputs=prediction.outputs.reshape(-1).tolist(),  # a list converts in C; an array element-wise
            timesteps=rows,
            output_size=columns,
            offset=prediction.offset,
            replayed=prediction.replayed,
            request_id=prediction.request_id,
            model_version=prediction.model_version,
        )
        set_migration(response, prediction)
        return response

    async def predict(self, request: pb.PredictRequest, tenant: str, time_remaining: float | None = None,
                      trace: RequestTrace | None = None) -> pb.PredictResponse:
        """`trace`: the request's server span (server/api/tracing.py), None with tracing off."""
        if trace is None:
            return self._response(await self.dataplane.predict(self._chunk(request, tenant), time_remaining))
        with trace:  # ends the span if the request is refused before it is queued
            answer = self.dataplane.predict(self._chunk(request, tenant, trace), time_remaining)
        return self._response(await trace.answer(answer))

    @unary_errors
    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        return await self.predict(request, TENANT.get(), context.time_remaining(), self._trace(context, "Predict"))

    async def PredictStream(
        self, requests: AsyncIterator[pb.PredictRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PredictResponse]:
        tenant = TENANT.get()  # set for the whole call by the API-key interceptor
        if self.tracing is not None:
            async for response in self._traced_stream(requests, context, tenant):
                yield response
            return

        def start(request: pb.PredictRequest) -> asyncio.Future[Prediction]:
            return self.dataplane.submit(self._chunk(request, tenant), context.time_remaining())

        async def finish(answer: asyncio.Future[Prediction]) -> pb.PredictResponse:
            return self._response(await answer)

        async for response in answer_in_order(
            requests, start, finish, error_result, self.dataplane.abandon, self.window
        ):
            yield response

    async def _traced_stream(self, requests: AsyncIterator[pb.PredictRequest], context: grpc.aio.ServicerContext,
                             tenant: str) -> AsyncIterator[pb.PredictResponse]:
        """PredictStream with tracing on: a server span per message, continuing the stream's `traceparent`."""
        Handle = tuple[RequestTrace, asyncio.Future[Prediction]]

        def start(request: pb.PredictRequest) -> Handle:
            trace = self._trace(context, "PredictStream")
            assert trace is not None
            with trace:
                return trace, self.dataplane.submit(self._chunk(request, tenant, trace), context.time_remaining())

        async def finish(handle: Handle) -> pb.PredictResponse:
            return self._response(await handle[0].answer(handle[1]))

        def abandon(handles: list[Handle]) -> None:
            for trace, _ in handles:
                trace.end(asyncio.CancelledError())
            self.dataplane.abandon([answer for _, answer in handles])

        async for response in answer_in_order(requests, start, finish, error_result, abandon, self.window):
            yield response

    def _submit_batch(self, request: pb.PredictBatchRequest, time_remaining: float | None,
                      trace: RequestTrace | None = None) -> BatchAnswers:
        """Validate and queue a message's chunks; raises ServiceError when the message is refused whole."""
        with trace if trace is not None else contextlib.nullcontext():  # a refused message ends its span
            chunks = batch_chunks(
                request, models=self._shapes, max_timesteps=self.dataplane.max_chunk_timesteps,
                limits=self.batch_limits, tenant=TENANT.get(), deadline=self.dataplane.deadline(time_remaining),
            )
            if trace is not None:
                for chunk in chunks:
                    if isinstance(chunk, Chunk):
                        trace.chunk(chunk)
            return self.dataplane.submit_many(chunks)

    async def _batch_answers(self, request: pb.PredictBatchRequest, answers: BatchAnswers,
                             trace: RequestTrace | None = None) -> pb.PredictBatchResponse:
        """Wait for every chunk's answer; a chunk's error is its own result. If the wait is cancelled (the
        call broke), the chunks not yet started are dropped, never run later (invariant 11)."""
        outcomes: list[Prediction | ServiceError] = []
        try:
            for answer in answers:
                if isinstance(answer, ServiceError):
                    outcomes.append(answer)
                    continue
                try:
                    outcomes.append(await answer)
                except ServiceError as exc:
                    outcomes.append(exc)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    outcomes.append(as_service_error(exc))
        except BaseException as exc:
            self.dataplane.abandon(_futures([answers]))
            if trace is not None:
                trace.end(exc)
            raise
        if trace is not None:
            trace.end(None, outcomes)
        return batch_response(request, outcomes)

    @unary_errors
    async def PredictBatch(
        self, request: pb.PredictBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictBatchResponse:
        trace = self._trace(context, "PredictBatch")
        return await self._batch_answers(request, self._submit_batch(request, context.time_remaining(), trace), trace)

    async def PredictBatchStream(
        self, requests: AsyncIterator[pb.PredictBatchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PredictBatchResponse]:
        Handle = tuple[pb.PredictBatchRequest, BatchAnswers, RequestTrace | None]

        def start(request: pb.PredictBatchRequest) -> Handle:
            trace = self._trace(context, "PredictBatchStream")
            return request, self._submit_batch(request, context.time_remaining(), trace), trace

        async def finish(handle: Handle) -> pb.PredictBatchResponse:
            return await self._batch_answers(*handle)

        def abandon(handles: list[Handle]) -> None:
            for _, _, trace in handles:
                if trace is not None:
                    trace.end(asyncio.CancelledError())
            self.dataplane.abandon(_futures([answers for _, answers, _ in handles]))

        async for response in answer_in_order(
            requests, start, finish, lambda _request, error: refused_response(error), abandon, self.window
        ):
            yield response

    async def reset_stream(self, request: pb.ResetStreamRequest, tenant: str,
                           time_remaining: float | None = None) -> pb.ResetStreamResponse:
        existed = await self.dataplane.reset_stream(
            check_stream_id(request.stream_id), time_remaining, tenant, request.model
        )
        return pb.ResetStreamResponse(existed=existed)

    @unary_errors
    async def ResetStream(
        self, request: pb.ResetStreamRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResetStreamResponse:
        return await self.reset_stream(request, TENANT.get(), context.time_remaining())

    async def get_stream(self, request: pb.GetStreamRequest, tenant: str,
                         time_remaining: float | None = None) -> pb.StreamInfo:
        status = await self.dataplane.stream_status(
            check_stream_id(request.stream_id), time_remaining, tenant, request.model
        )
        return pb.StreamInfo(
            stream_id=status.stream_id,
            exists=status.exists,
            offset=status.offset,
            updated_unix_ms=status.updated_unix_ms,
            expires_in_ms=status.expires_in_ms,
            model_fingerprint=status.model_fingerprint,
            model=status.model,
            model_version=status.model_version,
        )

    @unary_errors
    async def GetStream(self, request: pb.GetStreamRequest, context: grpc.aio.ServicerContext) -> pb.StreamInfo:
        return await self.get_stream(request, TENANT.get(), context.time_remaining())

    @unary_errors
    async def GetStreamState(self, request: pb.GetStreamStateRequest, context: grpc.aio.ServicerContext
                             ) -> pb.StreamState:
        state = await self.dataplane.stream_state(
            check_stream_id(request.stream_id), request.model, 0, context.time_remaining(), TENANT.get()
        )
        return state_to_proto(state)

    @unary_errors
    async def SetStreamState(self, request: pb.StreamState, context: grpc.aio.ServicerContext
                             ) -> pb.SetStreamStateResponse:
        offset, version = await self.dataplane.set_stream_state(
            state_from_proto(request), context.time_remaining(), TENANT.get()
        )
        return pb.SetStreamStateResponse(offset=offset, model_version=version)

    def model_info(self, request: pb.GetModelRequest) -> pb.ModelInfo:
        served = self.dataplane.served(request.name)
        number, model = served.describe(request.version)
        return pb.ModelInfo(
            name=model.name,
            fingerprint=model.fingerprint,
            input_features=model.input_features,
            output_size=model.output_size,
            max_chunk_timesteps=self.dataplane.max_chunk_timesteps,
            per_timestep_outputs=model.per_timestep_outputs,
            recurrent_layers=[
                pb.RecurrentLayer(name=layer.name, kind=layer.kind, units=layer.units)
                for layer in model.recurrent_layers
            ],
            state_size=model.state_size,
            server_version=server_version(),
            max_batch_chunks=self.batch_limits.chunks,
            max_batch_timesteps=self.batch_limits.timesteps,
            version=number,
        )

    @unary_errors
    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return self.model_info(request)

    @unary_errors
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[
            pb.ModelVersionStatus(name=row.model, version=row.number, state=row.state, reason=row.reason,
                                  fingerprint=row.fingerprint)
            for row in self.dataplane.version_status()
        ])
