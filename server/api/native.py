"""The native API, `lstm_stream.v1.StreamInference`: protobuf in, DataPlane, protobuf out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np

from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc as pb_grpc
from lstm_stream.wire import status_number
from server.api.auth import TENANT
from server.api.errors import unary_errors
from server.api.streaming import StreamWindow, answer_in_order
from server.api.validation import check_stream_id, make_chunk
from server.dataplane.plane import DataPlane
from server.errors import ServiceError
from server.types import Chunk, Prediction
from server.version import server_version


class StreamInferenceServicer(pb_grpc.StreamInferenceServicer):
    def __init__(self, dataplane: DataPlane, window: StreamWindow) -> None:
        self.dataplane = dataplane
        self.window = window

    def _chunk(self, request: pb.PredictRequest) -> Chunk:
        return make_chunk(
            stream_id=request.stream_id,
            values=np.asarray(request.values, dtype=np.float32),
            timesteps=request.timesteps,
            features=self.dataplane.model.input_features,
            max_timesteps=self.dataplane.max_chunk_timesteps,
            start_offset=request.start_offset if request.HasField("start_offset") else None,
            reset=request.reset,
            end=request.end,
            request_id=request.request_id,
            tenant=TENANT.get(),
        )

    @staticmethod
    def _response(prediction: Prediction) -> pb.PredictResponse:
        rows, columns = prediction.outputs.shape
        return pb.PredictResponse(
            stream_id=prediction.stream_id or "",
            outputs=prediction.outputs.reshape(-1).tolist(),  # a list converts in C; an array element-wise
            timesteps=rows,
            output_size=columns,
            offset=prediction.offset,
            replayed=prediction.replayed,
            request_id=prediction.request_id,
        )

    @unary_errors
    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        return self._response(await self.dataplane.predict(self._chunk(request), context.time_remaining()))

    async def PredictStream(
        self, requests: AsyncIterator[pb.PredictRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PredictResponse]:
        def start(request: pb.PredictRequest) -> asyncio.Future[Prediction]:
            return self.dataplane.submit(self._chunk(request), context.time_remaining())

        async def finish(answer: asyncio.Future[Prediction]) -> pb.PredictResponse:
            return self._response(await answer)

        async for response in answer_in_order(
            requests, start, finish, self._stream_error, self.dataplane.abandon, self.window
        ):
            yield response

    @staticmethod
    def _stream_error(request: pb.PredictRequest, error: ServiceError) -> pb.PredictResponse:
        return pb.PredictResponse(
            stream_id=request.stream_id,
            request_id=request.request_id,
            offset=error.current_offset or 0,
            error=pb.Error(code=status_number(error.code), message=error.message),
        )

    @unary_errors
    async def ResetStream(
        self, request: pb.ResetStreamRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResetStreamResponse:
        existed = await self.dataplane.reset_stream(
            check_stream_id(request.stream_id), context.time_remaining(), TENANT.get()
        )
        return pb.ResetStreamResponse(existed=existed)

    @unary_errors
    async def GetStream(self, request: pb.GetStreamRequest, context: grpc.aio.ServicerContext) -> pb.StreamInfo:
        status = await self.dataplane.stream_status(
            check_stream_id(request.stream_id), context.time_remaining(), TENANT.get()
        )
        return pb.StreamInfo(
            stream_id=status.stream_id,
            exists=status.exists,
            offset=status.offset,
            updated_unix_ms=status.updated_unix_ms,
            expires_in_ms=status.expires_in_ms,
            model_fingerprint=status.model_fingerprint,
        )

    @unary_errors
    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        model = self.dataplane.model
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
        )
