"""`lstm-loadtest --gateways G`: the sensors of a process reach the server through G gateway connections,
each forwarding many sensors' chunks per message (PredictBatch, or one long-lived PredictBatchStream with
`--api stream`), the way an edge gateway, a PLC or a message-bus consumer forwards a tick of its sensors.

Each sensor keeps its own driver (drivers.py: its order, offsets, retries, breaks and verification); a
gateway only gathers what its sensors send within one turn of the event loop into one message, the values
in one packed float32 block, and hands each sensor its own result. So a gateway's tick is whatever its
sensors sent together: in a closed loop, every sensor whose last chunk was answered by the previous message.

A chunk's own error is that sensor's (`ChunkFailed`); a message refused whole, a broken call or no answer in
time fails every chunk of the message as a break, and each sensor resends its chunk by offset, as it would
alone: the server applies a chunk at most once and answers a repeat of an applied one with `replayed`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from loadtest.recorder import Recorder
from loadtest.transports import ChunkFailed
from lstm_stream.client.arrays import batch_outputs, batch_request
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc as pb_grpc
from lstm_stream.wire import status_from_number


@dataclass(frozen=True, slots=True)
class ChunkAnswer:
    """One chunk's answer out of a gateway message: the fields a driver reads of a PredictResponse, with the
    outputs a flat float32 view of the message's block (no Python object per value)."""

    outputs: np.ndarray
    timesteps: int
    output_size: int
    offset: int
    replayed: bool
    model_version: int = 0
    migrated_from: int = 0  # the retired version the server moved the stream off (0: none)


@dataclass(slots=True)
class _Queued:
    request: pb.PredictRequest
    values: np.ndarray
    answer: asyncio.Future[ChunkAnswer]
    timeout: float  # the sensor's deadline for this attempt


class GatewayTransport:
    """One gateway connection shared by many sensors: `send(request, timeout, values)` queues a chunk and waits
    for its answer; the chunks queued within one turn of the event loop leave in one message."""

    packs_values = True  # drivers hand the values apart from the request: they travel in the message's block

    def __init__(self, stub: pb_grpc.StreamInferenceStub, recorder: Recorder,
                 metadata: tuple[tuple[str, str], ...] = (), *, streaming: bool, max_chunks: int) -> None:
        self.stub = stub
        self.recorder = recorder
        self.metadata = metadata
        self.streaming = streaming
        self.max_chunks = max_chunks  # the server's ModelInfo.max_batch_chunks
        self._queued: list[_Queued] = []
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._call: Any = None
        self._unanswered: deque[list[_Queued]] = deque()  # messages on the PredictBatchStream call, in order
        self._outbox: asyncio.Queue[pb.PredictBatchRequest] | None = None  # the call's writer sends these in order
        self._reader: asyncio.Task[None] | None = None

    async def send(self, request: pb.PredictRequest, timeout: float, values: np.ndarray) -> ChunkAnswer:
        loop = asyncio.get_running_loop()
        queued = _Queued(request, values, loop.create_future(), timeout)
        self._queued.append(queued)
        if len(self._queued) >= self.max_chunks:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)  # after the other sensors woken with this one have queued theirs
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(queued.answer)
        except TimeoutError:
            if self.streaming:
                self._break("no answer within the attempt timeout")  # resent on a new call
            raise ChunkFailed(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:g} s") from None

    def _flush(self) -> None:
        self._flush_scheduled = False
        queued, self._queued = self._queued, []
        if not queued:
            return
        self.recorder.gateway_messages += 1
        message = batch_request([q.request for q in queued], [q.values for q in queued])
        if self.streaming:
            self._write(message, queued)
        else:
            task = asyncio.create_task(self._unary(message, queued))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _unary(self, message: pb.PredictBatchRequest, queued: list[_Queued]) -> None:
        try:
            response = await self.stub.PredictBatch(message, metadata=self.metadata,
                                                    timeout=max(q.timeout for q in queued))
        except grpc.aio.AioRpcError as exc:
            _fail_all(queued, ChunkFailed.from_rpc(exc))
            return
        if not _answer(queued, response):
            _fail_all(queued, ChunkFailed(grpc.StatusCode.INTERNAL, "the answer does not match the message"))

    def _write(self, message: pb.PredictBatchRequest, queued: list[_Queued]) -> None:
        if self._call is None:
            self._call = self.stub.PredictBatchStream(metadata=self.metadata)
            self._outbox = asyncio.Queue()
            self._reader = asyncio.create_task(self._read(self._call))
            writer = asyncio.create_task(self._writer(self._call, self._outbox))
            self._tasks.add(writer)
            writer.add_done_callback(self._tasks.discard)
        # Answers come back in the order the messages were written: one writer per call keeps that order.
        self._unanswered.append(queued)
        self._outbox.put_nowait(message)  # type: ignore[union-attr]

    async def _writer(self, call: Any, outbox: asyncio.Queue[pb.PredictBatchRequest]) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            while True:
                await call.write(await outbox.get())
        # A failed write ends the call: the reader's side sees why, and every unanswered message fails as a break.
        self._break_with(call, ChunkFailed(grpc.StatusCode.UNAVAILABLE, "the stream broke while writing",
                                           transport_break=True))

    async def _read(self, call: Any) -> None:
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise ChunkFailed(grpc.StatusCode.UNAVAILABLE, "the server ended the stream", transport_break=True)
                if call is not self._call or not self._unanswered:
                    return
                if not _answer(self._unanswered.popleft(), response):
                    raise ChunkFailed(grpc.StatusCode.UNAVAILABLE, "an answer did not match its message",
                                      transport_break=True)
        except grpc.aio.AioRpcError as exc:
            self._break_with(call, ChunkFailed.from_rpc(exc))
        except ChunkFailed as failure:
            self._break_with(call, failure)

    def _break(self, why: str) -> None:
        if self._call is not None:
            self._break_with(self._call, ChunkFailed(grpc.StatusCode.UNAVAILABLE, why, transport_break=True))

    def _break_with(self, call: Any, failure: ChunkFailed) -> None:
        """The call is given up: every message on it fails as a break (or with the call's own status)."""
        if call is not self._call:
            return
        self._call = None
        call.cancel()
        while self._unanswered:
            _fail_all(self._unanswered.popleft(), failure)

    async def close(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError, grpc.aio.UsageError):
                async with asyncio.timeout(2.0):
                    await call.done_writing()
            call.cancel()
        for task in [*self._tasks, *([self._reader] if self._reader else [])]:
            task.cancel()
        _fail_all([q for message in self._unanswered for q in message] + self._queued,
                  ChunkFailed(grpc.StatusCode.CANCELLED, "the load is over"))


def _answer(queued: list[_Queued], response: pb.PredictBatchResponse) -> bool:
    """Hand each sensor its result; False (nobody answered) when the results are not this message's."""
    if response.HasField("error"):  # the whole message was refused: every sensor retries its chunk
        code = status_from_number(response.error.code)
        _fail_all(queued, ChunkFailed(code, response.error.message))
        return True
    if len(response.results) != len(queued) or any(
            q.request.stream_id != result.stream_id for q, result in zip(queued, response.results, strict=True)):
        return False
    for q, result, outputs in zip(queued, response.results, batch_outputs(response), strict=True):
        if q.answer.done():
            continue
        if outputs is None:  # the chunk's own error
            code = status_from_number(result.error.code)
            offset = result.offset if code == grpc.StatusCode.FAILED_PRECONDITION else None
            q.answer.set_exception(ChunkFailed(code, result.error.message, offset))
            continue
        q.answer.set_result(ChunkAnswer(outputs.reshape(-1), result.timesteps, result.output_size,
                                        result.offset, result.replayed, result.model_version,
                                        result.migration.from_version if result.HasField("migration") else 0))
    return True


def _fail_all(queued: list[_Queued], failure: ChunkFailed) -> None:
    for q in queued:
        if not q.answer.done():
            q.answer.set_exception(failure)
            q.answer.exception()  # retrieved: a sensor that timed out no longer awaits it
