"""`AsyncStream.pipe`'s state machine: up to `window` chunks in flight on one PredictStream call, the
unanswered ones resent in order, by offset, on a new call after a break (the rules are in aio.py's
docstring; what a break may cost with a window larger than the server's replay window is `OutputsLost`).

A break is anything that ends the call without an answer for the oldest unanswered chunk: a call-level
status the transport or a proxy made (`lstm_stream.wire.is_transport_break`: UNAVAILABLE, CANCELLED,
INTERNAL "Stream removed" / RST_STREAM without the server's marks), a retryable status, the call ending
(EOF) with chunks unanswered, or no answer within the attempt timeout. A chunk's own error (in-band
`error`: FAILED_PRECONDITION, INVALID_ARGUMENT, ...) is not a break: it is raised.

Three tasks share one `Pipe`: the feeder pulls the caller's chunks as window slots free up, the writer
puts pending pieces on the current call, and `outputs` (the caller's iteration) reads the answers in
order, reconnecting after a break with the retry policy's backoff and deadline per oldest chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np

from lstm_stream.client.arrays import Chunks, aiter_chunks, as_input, join, pieces
from lstm_stream.client.errors import (
    ClientError,
    OutputsLost,
    RequestRejected,
    ServerUnavailable,
    StreamPositionError,
    rejected,
)
from lstm_stream.client.retry import Budget, RetryPolicy
from lstm_stream.client.types import ModelInfo
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.wire import is_transport_break, status_from_number


class PipedStream(Protocol):
    """What a pipe needs of its stream handle (`AsyncStream`)."""

    stream_id: str
    offset: int

    def _request(self, piece: np.ndarray, start: int, *, end: bool) -> pb.PredictRequest: ...

    def _accept(self, response: pb.PredictResponse, request: pb.PredictRequest) -> np.ndarray: ...


@dataclass(eq=False)
class Piece:
    """One request of a pipe: a caller's chunk, or part of one longer than the server's limit."""

    seq: int
    request: pb.PredictRequest
    last_of_chunk: bool
    first_sent: float | None = None
    sent_at: float | None = None
    sends: int = 0

    @property
    def start(self) -> int:
        return self.request.start_offset

    @property
    def end(self) -> int:
        return self.request.start_offset + self.request.timesteps


@dataclass(eq=False)
class Pipe:
    stream: PipedStream
    model: ModelInfo
    window: int
    policy: RetryPolicy
    target: str
    open_call: Callable[[], Any]  # a new PredictStream call
    pending: deque[Piece] = field(default_factory=deque)  # sent or to send, unanswered, in order
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    source_done: bool = False
    source_error: BaseException | None = None
    next_seq: int = 0
    # The current call and what the reader knows of it.
    call: Any = None
    writer: asyncio.Task[None] | None = None
    head_budget: Budget | None = None  # the oldest unanswered chunk's retries
    broke: str | None = None  # why the current call is given up, once it is
    parts: list[np.ndarray] = field(default_factory=list)  # answered pieces of the chunk being answered
    slots: asyncio.Semaphore = field(init=False)  # one per piece in flight, `window` in all

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.window)

    async def feed(self, chunks: Chunks) -> None:
        """Pull the caller's chunks only as window slots free up: read-ahead stays bounded."""
        start = self.stream.offset
        try:
            async for chunk in aiter_chunks(chunks):
                split = pieces(as_input(chunk, self.model), self.model.max_chunk_timesteps)
                for number, values in enumerate(split):
                    await self.slots.acquire()
                    piece = Piece(self.next_seq, self.stream._request(values, start, end=False),
                                  last_of_chunk=number == len(split) - 1)
                    self.next_seq += 1
                    start = piece.end
                    async with self.changed:
                        self.pending.append(piece)
                        self.changed.notify_all()
        except Exception as exc:  # handed to the caller after the chunks before it are answered
            self.source_error = exc
        finally:
            async with self.changed:
                self.source_done = True
                self.changed.notify_all()

    def _has(self, seq: int) -> bool:
        return bool(self.pending) and self.pending[-1].seq >= seq

    def _writable(self, seq: int) -> bool:
        return self._has(seq) or self.source_done

    async def write(self, call: Any, from_seq: int) -> None:
        """Write pieces from `from_seq` on as they come; half-close once the source is exhausted."""
        seq = from_seq
        try:
            while True:
                async with self.changed:
                    await self.changed.wait_for(functools.partial(self._writable, seq))
                    piece = self.pending[seq - self.pending[0].seq] if self._has(seq) else None
                if piece is None:
                    await call.done_writing()
                    return
                now = time.monotonic()
                piece.sent_at = now
                piece.first_sent = piece.first_sent or now
                piece.sends += 1
                await call.write(piece.request)
                seq += 1
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            return  # the call broke: the reader sees why and reconnects

    async def outputs(self, chunks: Chunks) -> AsyncIterator[np.ndarray]:
        """Each chunk's outputs, in order, across as many calls as the breaks need."""
        feeder = asyncio.create_task(self.feed(chunks))
        try:
            while True:
                async with contextlib.aclosing(self._one_call()) as answers:
                    async for outputs in answers:
                        yield outputs
                if self.broke is None:
                    break
                await self._pause_after_break()
            await feeder
            if self.source_error is not None:
                raise self.source_error
            with contextlib.suppress(grpc.aio.AioRpcError):
                await asyncio.wait_for(self.call.code(), self.policy.attempt_timeout_s)
        finally:
            feeder.cancel()
            if self.call is not None:
                await self._close()

    async def _one_call(self) -> AsyncIterator[np.ndarray]:
        """Open a call, (re)send the unanswered pieces on it and read answers until it breaks (`broke`
        says why) or everything is answered."""
        for piece in self.pending:
            piece.sent_at = None  # to be resent on this call; its attempt's clock starts then
        self.call = self.open_call()
        self.writer = asyncio.create_task(self.write(self.call, self.pending[0].seq if self.pending else self.next_seq))
        if self.head_budget is not None:
            self.head_budget.attempt_timeout_s()
        self.broke = None
        while self.broke is None:
            async with self.changed:
                await self.changed.wait_for(lambda: bool(self.pending) or self.source_done)
                head = self.pending[0] if self.pending else None
            if head is None:
                return  # everything answered and the source is done
            response = await self._read_answer(head)
            if response is not None and (outputs := await self._take(head, response)) is not None:
                yield outputs

    async def _read_answer(self, head: Piece) -> pb.PredictResponse | None:
        """The next answer on the call, or None with `broke` set when the call is to be given up."""
        if self.head_budget is None:
            self.head_budget = Budget(self.policy)
            self.head_budget.attempt_timeout_s()
        if head.sent_at is None:
            await asyncio.sleep(0)  # let the writer put it on the wire first
        wait = (head.sent_at or time.monotonic()) + self.policy.attempt_timeout_s - time.monotonic()
        try:
            response = await asyncio.wait_for(self.call.read(), max(0.001, min(wait, self.head_budget.remaining_s())))
        except TimeoutError:
            self.broke = f"no answer within {self.policy.attempt_timeout_s:g} s"
            return None
        except grpc.aio.AioRpcError as exc:
            # The server ends a PredictStream with a status only for the whole call (UNAUTHENTICATED, a
            # limit): those are raised. Everything else ended it under the chunks: resend them.
            if exc.code() not in self.policy.retryable and not is_transport_break(
                    exc.code(), exc.details(), exc.trailing_metadata()):
                raise rejected(exc, self.target) from None
            self.broke = f"{exc.code().name}: {exc.details()}"
            return None
        if response is grpc.aio.EOF:
            self.broke = "the server ended the call"
            return None
        return response  # type: ignore[no-any-return]

    async def _take(self, head: Piece, response: pb.PredictResponse) -> np.ndarray | None:
        """Accept the oldest piece's answer; returns its chunk's outputs once the chunk is complete."""
        if response.request_id != head.request.request_id:
            raise ClientError(f"stream {self.stream.stream_id!r}: answer for request {response.request_id!r} "
                              f"arrived where {head.request.request_id!r} was expected")
        if response.HasField("error"):
            self.broke = self._refused(head, response.error, response.offset)
            return None
        self.parts.append(self.stream._accept(response, head.request))
        async with self.changed:
            self.pending.popleft()
            self.changed.notify_all()
        self.slots.release()
        self.head_budget = None
        if not head.last_of_chunk:
            return None
        outputs, self.parts = join(self.parts, self.model), []
        return outputs

    async def _pause_after_break(self) -> None:
        """Close the broken call and wait the backoff, or raise when the oldest chunk's deadline is spent."""
        await self._close()
        self.call = self.writer = None
        pause = self.head_budget.next_wait_s() if self.head_budget is not None else 0.0
        if pause is None:
            head = self.pending[0]
            raise ServerUnavailable(
                f"stream {self.stream.stream_id!r}: the chunk at offset {head.start} got no answer from "
                f"{self.target} within the deadline ({head.sends} attempts); last: {self.broke}",
                grpc.StatusCode.UNAVAILABLE)
        await asyncio.sleep(pause)

    def _refused(self, head: Piece, error: pb.Error, server_offset: int) -> str:
        """An in-band error for the oldest unanswered chunk: a reason to reconnect, or raised."""
        code = status_from_number(error.code)
        stream = self.stream
        if code in self.policy.retryable:
            return f"{code.name}: {error.message}"
        if code != grpc.StatusCode.FAILED_PRECONDITION:
            raise RequestRejected(f"stream {stream.stream_id!r}, chunk at offset {head.start}: {code.name}: "
                                  f"{error.message}", code)
        if head.sends > 1 and server_offset > head.start:
            # A resent chunk after a break, refused: the server went on past it and no longer keeps its
            # answer (more chunks were applied unanswered than its --replay-window). Which unanswered
            # chunk ends where the server stands tells how many were applied with their answers lost.
            applied = [piece for piece in self.pending if piece.end == server_offset]
            if applied:
                stream.offset = server_offset
                raise OutputsLost(stream.stream_id, head.start, server_offset, server_offset)
        raise StreamPositionError(stream.stream_id, head.start, server_offset, error.message)

    async def _close(self) -> None:
        self.call.cancel()
        if self.writer is not None:
            self.writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.writer
