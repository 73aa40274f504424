"""The pipes' state machine: up to `window` requests in flight on one streaming call, the unanswered ones
resent in order, by offset, on a new call after a break (the rules are in aio.py's docstring; what a break
may cost with a window larger than the server's replay window is `OutputsLost`). `AsyncStream.pipe` carries
one stream's chunks on PredictStream (`StreamLane`, here); a gateway's pipe carries ticks of many streams
on PredictBatchStream (`TickLane`, gateway.py). The call, the window and the breaks are the `Pipe`'s; what a
request holds and what an answer means are the lane's.

A migration (the server moved a stream off a retired model version, starting a new sequence: aio.py's
docstring) moves the stream's offset under the pieces planned after the migrated one; the lane plans them
again from the answer's offset (`replanned`), and the pipe resends them on a new call, as after a break.

A break is anything that ends the call without an answer for the oldest unanswered chunk: a call-level
status the transport or a proxy made (`lstm_stream.wire.is_transport_break`: UNAVAILABLE, CANCELLED,
INTERNAL "Stream removed" / RST_STREAM without the server's marks), a retryable status, the call ending
(EOF) with chunks unanswered, or no answer within the attempt timeout. A chunk's own error (in-band
`error`: FAILED_PRECONDITION, INVALID_ARGUMENT, ...) is not a break: it is raised.

Three tasks share one `Pipe`: the feeder pulls the caller's items (chunks, ticks) as window slots free up,
the writer puts pending pieces on the current call, and `outputs` (the caller's iteration) reads the
answers in order, reconnecting after a break with the retry policy's backoff and deadline per oldest piece.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import grpc
import numpy as np

from lstm_stream.client.arrays import Chunks, aiter_chunks, as_input, join, outputs_of, pieces
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

Out = TypeVar("Out")


@dataclass(frozen=True)
class Position:
    """Where a stream handle stands: the offset its next chunk starts at, the number of its sequence (part
    of every request id, so a new sequence never repeats an id), and whether its next chunk starts a new
    sequence (`start_new()`: sent with `reset`)."""

    offset: int = 0
    sequence: int = 0
    new_sequence: bool = False

    def after(self, request: pb.PredictRequest) -> Position:
        """Where the handle stands once `request`, sent from this position, is applied."""
        if request.end:
            return Position(0, self.sequence + 1)  # the sequence is over: the next chunk starts another
        return Position(request.start_offset + request.timesteps, self.sequence)


class PipedStream(Protocol):
    """What a pipe needs of a stream handle (`AsyncStream`)."""

    stream_id: str
    position: Position
    offset: int
    migration: Any  # the last answer's `Migration`, or None

    def _request(self, piece: np.ndarray, at: Position, *, end: bool, packed: bool = False) -> pb.PredictRequest: ...

    def _accept(self, response: pb.PredictResponse, request: pb.PredictRequest, after: Position) -> None: ...

    def _replanned(self, request: pb.PredictRequest, at: Position) -> pb.PredictRequest: ...


def position_error(stream_id: str, start: int, server_offset: int, detail: str, *, resent: bool,
                   unanswered_ends: set[int]) -> StreamPositionError:
    """The error for a chunk at `start` refused with FAILED_PRECONDITION, the server being at `server_offset`.

    A resent chunk (after a break) refused because the server went on past it: the server no longer keeps
    its answer (more chunks were applied unanswered than its --replay-window). Which unanswered chunk ends
    where the server stands tells how many were applied with their answers lost: `OutputsLost`. Anything
    else: `StreamPositionError`."""
    if resent and server_offset > start and server_offset in unanswered_ends:
        return OutputsLost(stream_id, start, server_offset, server_offset)
    return StreamPositionError(stream_id, start, server_offset, detail)


@dataclass(eq=False)
class Piece:
    """One request of a pipe (a chunk, or part of one longer than the server's limit; or a gateway's
    message), with what its lane keeps beside it (`data`)."""

    seq: int
    request: Any
    data: Any
    last_of_item: bool  # the last request of one of the caller's items: its outputs are complete
    first_sent: float | None = None
    sent_at: float | None = None
    sends: int = 0


class Lane(Protocol[Out]):
    """What a pipe carries: `StreamLane`, one stream's chunks on PredictStream; the gateway's `TickLane`,
    ticks of many streams on PredictBatchStream. The pipe owns the call, the window and the breaks; the
    lane turns the caller's items into requests and answers into outputs."""

    target: str

    def split(self, item: Any) -> list[tuple[Any, Any]]:
        """The requests for one of the caller's items, in order, each with the lane's data for it."""
        ...

    def take(self, piece: Piece, response: Any, unanswered: deque[Piece]) -> str | None:
        """Take the answer to the oldest unanswered piece. None: taken. A string: why the call is to be
        given up and the piece resent (a retryable in-band error). An error for good is raised."""
        ...

    def finish(self) -> Out:
        """The outputs of the item whose last piece was just taken."""
        ...

    def settle(self, piece: Piece) -> bool:
        """The oldest piece's deadline is spent: True when the lane took it with its failures as its
        answer (a gateway's message: the streams that kept failing get an error, the others their outputs);
        False to raise `unanswered`."""
        ...

    def unanswered(self, piece: Piece, reason: str) -> ClientError:
        """The error for a piece that got no answer within its deadline."""
        ...

    def replanned(self) -> str | None:
        """Asked after each answer taken: why the pieces still unanswered were planned again (a migration
        moved a stream's offset), so the call is to be given up and they resent on a new one; None: nothing."""
        ...


@dataclass(eq=False)
class StreamLane:
    """One stream's chunks on PredictStream: each piece is a PredictRequest, planned ahead of the handle
    (`planned`: where the next piece starts), and taken into the handle as its answer arrives."""

    stream: PipedStream
    model: ModelInfo
    target: str
    retryable: frozenset[grpc.StatusCode]
    planned: Position | None = None
    parts: list[np.ndarray] = field(default_factory=list)  # answered pieces of the chunk being answered
    migration: Any = None  # the chunk being answered: a migration of one of its pieces
    moved: str | None = None  # why the unanswered pieces were planned again (`replanned`)

    def split(self, item: Any) -> list[tuple[Any, Any]]:
        at = self.planned or self.stream.position
        planned = []
        for values in pieces(as_input(item, self.model), self.model.max_chunk_timesteps):
            request = self.stream._request(values, at, end=False)
            planned.append((request, at.after(request)))
            at = at.after(request)
        self.planned = at
        return planned

    def take(self, piece: Piece, response: Any, unanswered: deque[Piece]) -> str | None:
        request: pb.PredictRequest = piece.request
        if response.request_id != request.request_id:
            raise ClientError(f"stream {self.stream.stream_id!r}: answer for request {response.request_id!r} "
                              f"arrived where {request.request_id!r} was expected")
        if response.HasField("error"):
            return self._refused(piece, response.error, response.offset, unanswered)
        self.stream._accept(response, request, piece.data)
        self.parts.append(outputs_of(response))
        if self.stream.migration is not None:
            self.migration = self.stream.migration
            self._plan_again(list(unanswered)[1:])
        return None

    def _plan_again(self, later: list[Piece]) -> None:
        """The stream moved to the answer's offset: the pieces after the migrated one, sent from offsets the
        server no longer has (it refuses them, changing nothing), are planned again from there."""
        at = self.stream.position
        for piece in later:
            request = self.stream._replanned(piece.request, at)
            piece.request, piece.data, piece.sends = request, at.after(request), 0
            at = piece.data
        self.planned = at
        if later:
            self.moved = f"stream {self.stream.stream_id!r} moved to another model version; its chunks in flight " \
                         "are sent again from its new offset"

    def replanned(self) -> str | None:
        moved, self.moved = self.moved, None
        return moved

    def finish(self) -> np.ndarray:
        outputs, self.parts = join(self.parts, self.model), []
        self.stream.migration, self.migration = self.migration, None
        return outputs

    def settle(self, piece: Piece) -> bool:
        return False

    def unanswered(self, piece: Piece, reason: str) -> ClientError:
        return ServerUnavailable(
            f"stream {self.stream.stream_id!r}: the chunk at offset {piece.request.start_offset} got no answer "
            f"from {self.target} within the deadline ({piece.sends} attempts); last: {reason}",
            grpc.StatusCode.UNAVAILABLE)

    def _refused(self, piece: Piece, error: pb.Error, server_offset: int, unanswered: deque[Piece]) -> str:
        """An in-band error for the oldest unanswered chunk: a reason to reconnect, or raised."""
        code = status_from_number(error.code)
        stream, start = self.stream, piece.request.start_offset
        if code in self.retryable:
            return f"{code.name}: {error.message}"
        if code != grpc.StatusCode.FAILED_PRECONDITION:
            raise RequestRejected(f"stream {stream.stream_id!r}, chunk at offset {start}: {code.name}: "
                                  f"{error.message}", code)
        failure = position_error(stream.stream_id, start, server_offset, error.message, resent=piece.sends > 1,
                                 unanswered_ends={p.request.start_offset + p.request.timesteps for p in unanswered})
        if isinstance(failure, OutputsLost):
            stream.offset = server_offset
        raise failure


@dataclass(eq=False)
class Pipe(Generic[Out]):
    lane: Lane[Out]
    window: int
    policy: RetryPolicy
    open_call: Callable[[], Any]  # a new streaming call (PredictStream, PredictBatchStream)
    pending: deque[Piece] = field(default_factory=deque)  # sent or to send, unanswered, in order
    held: list[Piece] = field(default_factory=list)  # planned from the caller's current item, awaiting a slot
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    source_done: bool = False
    source_error: BaseException | None = None
    next_seq: int = 0
    # The current call and what the reader knows of it.
    call: Any = None
    writer: asyncio.Task[None] | None = None
    head_budget: Budget | None = None  # the oldest unanswered piece's retries
    broke: str | None = None  # why the current call is given up, once it is
    slots: asyncio.Semaphore = field(init=False)  # one per piece in flight, `window` in all

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.window)

    async def feed(self, items: Chunks) -> None:
        """Pull the caller's items only as window slots free up: read-ahead stays bounded."""
        try:
            async for item in aiter_chunks(items):
                split = self.lane.split(item)
                self.held = [Piece(0, request, data, last_of_item=number == len(split) - 1)
                             for number, (request, data) in enumerate(split)]
                while self.held:
                    await self.slots.acquire()
                    piece = self.held.pop(0)
                    piece.seq = self.next_seq
                    self.next_seq += 1
                    async with self.changed:
                        self.pending.append(piece)
                        self.changed.notify_all()
        except Exception as exc:  # handed to the caller after the items before it are answered
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

    async def outputs(self, items: Chunks) -> AsyncIterator[Out]:
        """Each item's outputs, in order, across as many calls as the breaks need."""
        feeder = asyncio.create_task(self.feed(items))
        try:
            while True:
                async with contextlib.aclosing(self._one_call()) as answers:
                    async for outputs in answers:
                        yield outputs
                if self.broke is None:
                    break
                if (settled := await self._pause_after_break()) is not None:
                    yield settled
            await feeder
            if self.source_error is not None:
                raise self.source_error
            with contextlib.suppress(grpc.aio.AioRpcError):
                await asyncio.wait_for(self.call.code(), self.policy.attempt_timeout_s)
        finally:
            feeder.cancel()
            if self.call is not None:
                await self._close()

    async def _one_call(self) -> AsyncIterator[Out]:
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

    async def _read_answer(self, head: Piece) -> Any:
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
            # The server ends a streaming call with a status only for the whole call (UNAUTHENTICATED, a
            # limit): those are raised. Everything else ended it under the pieces: resend them.
            if exc.code() not in self.policy.retryable and not is_transport_break(
                    exc.code(), exc.details(), exc.trailing_metadata()):
                raise rejected(exc, self.lane.target) from None
            self.broke = f"{exc.code().name}: {exc.details()}"
            return None
        if response is grpc.aio.EOF:
            self.broke = "the server ended the call"
            return None
        return response

    async def _take(self, head: Piece, response: Any) -> Out | None:
        """Hand the oldest piece's answer to the lane; returns its item's outputs once the item is complete.
        When the lane planned the unanswered pieces again, the call is given up (`broke`) to resend them."""
        # The pieces planned and not yet sent are the lane's too: a migration plans them again.
        self.broke = self.lane.take(head, response, deque([*self.pending, *self.held]) if self.held else self.pending)
        if self.broke is not None:
            return None
        outputs = await self._taken(head)
        self.broke = self.lane.replanned()
        return outputs

    async def _taken(self, head: Piece) -> Out | None:
        async with self.changed:
            self.pending.popleft()
            self.changed.notify_all()
        self.slots.release()
        self.head_budget = None
        return self.lane.finish() if head.last_of_item else None

    async def _pause_after_break(self) -> Out | None:
        """Close the broken call and wait the backoff. When the oldest piece's deadline is spent, the lane
        settles it (its outputs are returned when they complete an item) or its error is raised."""
        await self._close()
        self.call = self.writer = None
        pause = self.head_budget.next_wait_s() if self.head_budget is not None else 0.0
        if pause is None:
            head = self.pending[0]
            if not self.lane.settle(head):
                raise self.lane.unanswered(head, self.broke or "")
            return await self._taken(head)
        await asyncio.sleep(pause)
        return None

    async def _close(self) -> None:
        self.call.cancel()
        if self.writer is not None:
            self.writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.writer
