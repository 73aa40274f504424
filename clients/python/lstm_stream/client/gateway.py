"""A gateway: many streams' chunks per message over one connection (an edge gateway forwarding a tick of
many sensors), on PredictBatch and PredictBatchStream. `AsyncClient.gateway()` makes one; the sync
`Client.gateway()` runs this same code on its private loop.

A tick maps stream ids to their chunk, at most one chunk per stream (send the next chunk of a stream in
the next tick). Each stream keeps a handle (`AsyncStream`: offset, `start_new`, `resume`, request ids), and
every rule of aio.py's docstring holds per stream, with invariant 17 of the server's docs/invariants.md
(each chunk of a message is judged alone):

- A tick is one PredictBatch message, its values in one little-endian float32 block. More streams than
  the server's `ModelInfo.max_batch_chunks`, or more timesteps than `max_message_timesteps`, and it goes
  in several messages. A chunk longer than the server's `max_chunk_timesteps` is split as `AsyncStream`
  splits it, and its pieces go in consecutive messages: a message never holds two chunks of one stream,
  so one chunk's failure never makes the next chunk of its stream fail with it.
- Exactly-once: a call-level retryable status or a break resends the message (the same offsets and
  request ids) with the retry policy's backoff, within its deadline (one deadline for the whole tick);
  the server answers a chunk it already applied with its stored answer (`replayed`), which is the answer.
  A chunk's own retryable error (UNAVAILABLE, ABORTED, RESOURCE_EXHAUSTED, ...) resends that chunk in the
  next attempt, with the tick's other unfinished chunks, within the same deadline.
- A chunk's failure is its stream's alone: `GatewayResult.errors[stream_id]` holds it, the other
  streams' outputs are delivered. FAILED_PRECONDITION is a `StreamPositionError` for that stream
  (`gateway.resume(id)` or `gateway.start_new(id)`, as on a handle); a status retrying cannot change is a
  `RequestRejected`; a retryable one still failing at the deadline is a `ServerUnavailable` (nothing was
  applied twice: the next tick resends from the same offset). `result.raise_for_errors()` raises
  `ChunksFailed`, which carries both. If a split chunk fails part-way, the handle's offset says how much
  of it was applied (as `AsyncStream.send`).

`pipe(ticks, window=N)` keeps up to N messages in flight on one PredictBatchStream call (pipe.py's `Pipe`
with the `TickLane` below), and on a break resends the unanswered messages in order with the same
offsets and request ids. A stream has at most one chunk per message, so with N up to the server's
`--replay-window` (the default, 8) every output reaches the caller exactly once, whatever breaks, for the
reasons aio.py's docstring gives; a wider window may lose answers, reported as that stream's
`OutputsLost`. In a pipe a chunk's retryable error resends its whole message (and those after it) on a new
call, the chunks already applied answered `replayed`; when the deadline is spent the chunks still failing
get their `ServerUnavailable` and the rest of the message its outputs. A stream whose chunk failed for
good in a pipe fails in the ticks after it too (their chunks were planned from an offset the server
never reached) until a tick restarts it (`Tick.start_new`) or the pipe ends and it is resumed.

`client.gateway(model=NAME, version=V)`: every stream of the gateway belongs to that model (and its new
sequences start on version V; 0: the newest). `GatewayResult.versions`
says which model version answered each stream, `migrations` which streams the server moved off a retired
version (aio.py's docstring): such a stream's next pieces are planned again from the answer's offset (in a
pipe, the messages in flight after it are resent on a new call, as after a break).
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np

from lstm_stream.client import defaults
from lstm_stream.client.arrays import Chunks, aiter_chunks, as_input, batch_outputs, batch_request, join, pieces
from lstm_stream.client.errors import (
    ChunksFailed,
    ClientError,
    InvalidInput,
    OutputsLost,
    RequestRejected,
    ServerUnavailable,
    rejected,
)
from lstm_stream.client.pipe import Piece, Pipe, PipedStream, Position, position_error
from lstm_stream.client.retry import Budget, RetryPolicy, is_break
from lstm_stream.client.types import Migration, ModelInfo
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.wire import status_from_number


class GatewayStream(PipedStream, Protocol):
    """What a gateway needs of a stream handle (`AsyncStream`)."""

    def start_new(self) -> None: ...

    async def resume(self) -> int: ...

    async def reset(self) -> bool: ...


class GatewayClient(Protocol):
    """What a gateway needs of its client (`AsyncClient`)."""

    target: str
    retry: RetryPolicy
    _stub: Any
    _metadata: tuple[tuple[str, str], ...]

    async def _model_cached(self, model: str = "") -> ModelInfo: ...

    def stream(self, stream_id: str, *, model: str = "", version: int = 0) -> Any: ...


@dataclass(frozen=True)
class Tick:
    """One tick of a gateway's pipe: each stream's chunk (`values`), the streams whose sequence ends after
    this chunk (`end`, as `AsyncStream.end`), and those that start a new sequence with it (`start_new`).
    A plain mapping is a tick with neither."""

    values: Mapping[str, Any]
    end: Collection[str] = frozenset()
    start_new: Collection[str] = frozenset()


@dataclass(frozen=True)
class GatewayResult:
    """A tick's answer: `outputs` of the streams answered ([timesteps, outputs] each, as `AsyncStream.send`
    returns), `errors` of the streams that failed (each its own `ClientError`), in the tick's order."""

    outputs: dict[str, np.ndarray]
    errors: dict[str, ClientError]
    # The model version that answered each answered stream; the streams the server moved off a retired version.
    versions: dict[str, int] = field(default_factory=dict)
    migrations: dict[str, Migration] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def __getitem__(self, stream_id: str) -> np.ndarray:
        """The stream's outputs; its own error if it failed; KeyError if it was not in the tick."""
        if stream_id in self.errors:
            raise self.errors[stream_id]
        return self.outputs[stream_id]

    def raise_for_errors(self) -> GatewayResult:
        """Raise `ChunksFailed` (each failed stream's error, and the others' outputs) if any stream failed."""
        if self.errors:
            raise ChunksFailed(dict(self.errors), dict(self.outputs))
        return self


@dataclass(eq=False)
class _Chunk:
    """One request of one stream: a chunk, or a piece of one longer than the server takes."""

    handle: GatewayStream
    values: np.ndarray
    request: pb.PredictRequest  # its values travel in the message's block
    after: Position  # where the handle stands once it is applied
    sends: int = 0

    @property
    def end_offset(self) -> int:
        return self.request.start_offset + self.request.timesteps


def _plan(handle: GatewayStream, x: np.ndarray, at: Position, *, end: bool, model: ModelInfo) -> list[_Chunk]:
    """The requests for chunk `x` of `handle`'s stream, sent from `at`: one per piece the server takes."""
    split = pieces(x, model.max_chunk_timesteps)
    planned = []
    for number, values in enumerate(split):
        request = handle._request(values, at, end=end and number == len(split) - 1, packed=True)
        planned.append(_Chunk(handle, values, request, at.after(request)))
        at = at.after(request)
    return planned


def _plan_again(chunks: list[_Chunk]) -> None:
    """A stream the server moved off a retired version (a migration) stands at the answer's offset: its
    chunks not yet answered, planned from offsets it no longer has, are planned again from there."""
    if not chunks:
        return
    at = chunks[0].handle.position
    for chunk in chunks:
        chunk.request = chunk.handle._request(chunk.values, at, end=chunk.request.end, packed=True)
        chunk.after = at.after(chunk.request)
        chunk.sends = 0
        at = chunk.after


def _messages(chunks: list[_Chunk], max_chunks: int, max_timesteps: int) -> list[list[_Chunk]]:
    """`chunks` in order, cut into messages of at most `max_chunks` chunks and `max_timesteps` timesteps."""
    messages: list[list[_Chunk]] = [[]]
    timesteps = 0
    for chunk in chunks:
        size = chunk.request.timesteps
        if messages[-1] and (len(messages[-1]) >= max_chunks or timesteps + size > max_timesteps):
            messages.append([])
            timesteps = 0
        messages[-1].append(chunk)
        timesteps += size
    return messages


def _message(chunks: list[_Chunk]) -> pb.PredictBatchRequest:
    return batch_request([chunk.request for chunk in chunks], [chunk.values for chunk in chunks])


@dataclass(frozen=True)
class _Verdict:
    """What one chunk's result means: its outputs, a reason to send it again, or its stream's error."""

    outputs: np.ndarray | None = None
    retry: str | None = None
    error: ClientError | None = None
    version: int = 0
    migration: Migration | None = None


def _judge(chunk: _Chunk, result: pb.PredictResponse, outputs: np.ndarray | None,
           retryable: frozenset[grpc.StatusCode], unanswered_ends: Callable[[], set[int]]) -> _Verdict:
    """A chunk's result, judged without changing anything (`_commit` applies it to the handle)."""
    stream_id, start = chunk.handle.stream_id, chunk.request.start_offset
    if result.request_id != chunk.request.request_id:
        raise ClientError(f"stream {stream_id!r}: answer for request {result.request_id!r} arrived where "
                          f"{chunk.request.request_id!r} was expected")
    if not result.HasField("error"):
        return _Verdict(outputs=outputs, version=result.model_version, migration=Migration.from_response(result))
    code = status_from_number(result.error.code)
    if code in retryable:
        return _Verdict(retry=f"stream {stream_id!r}: {code.name}: {result.error.message}")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return _Verdict(error=position_error(stream_id, start, result.offset, result.error.message,
                                             resent=chunk.sends > 1, unanswered_ends=unanswered_ends()))
    return _Verdict(error=RequestRejected(f"stream {stream_id!r}, chunk at offset {start}: {code.name}: "
                                          f"{result.error.message}", code))


def _commit(chunk: _Chunk, result: pb.PredictResponse, verdict: _Verdict) -> None:
    """Move the handle: to where the chunk leaves it when answered, or to the server's offset when the
    answers of applied chunks were lost."""
    if verdict.outputs is not None:
        chunk.handle._accept(result, chunk.request, chunk.after)
    elif isinstance(verdict.error, OutputsLost):
        chunk.handle.offset = verdict.error.server_offset


def _results(chunks: list[_Chunk], response: pb.PredictBatchResponse) -> list[tuple[pb.PredictResponse, Any]]:
    if len(response.results) != len(chunks):
        raise ClientError(f"the server answered a message of {len(chunks)} chunks with "
                          f"{len(response.results)} results")
    return list(zip(response.results, batch_outputs(response), strict=True))


class _Tally:
    """The answers of one tick's streams, piece by piece, into its `GatewayResult`."""

    def __init__(self, order: list[str], model: ModelInfo) -> None:
        self.order = order
        self.model = model
        self.parts: dict[str, list[np.ndarray]] = {stream_id: [] for stream_id in order}
        self.errors: dict[str, ClientError] = {}
        self.versions: dict[str, int] = {}
        self.migrations: dict[str, Migration] = {}

    def add(self, stream_id: str, verdict: _Verdict) -> None:
        if verdict.error is not None:
            self.errors.setdefault(stream_id, verdict.error)  # the first: later pieces fail because of it
        elif verdict.outputs is not None:
            self.parts[stream_id].append(verdict.outputs)
            self.versions[stream_id] = verdict.version
            if verdict.migration is not None:
                self.migrations[stream_id] = verdict.migration

    def result(self) -> GatewayResult:
        answered = [stream_id for stream_id in self.order if stream_id not in self.errors]
        outputs = {stream_id: join(self.parts[stream_id], self.model) for stream_id in answered}
        return GatewayResult(outputs, {stream_id: self.errors[stream_id] for stream_id in self.order
                                       if stream_id in self.errors},
                             {stream_id: self.versions[stream_id] for stream_id in answered},
                             {stream_id: self.migrations[stream_id] for stream_id in answered
                              if stream_id in self.migrations})


class AsyncGateway:
    """Many streams' chunks per message over one connection; see the module's docstring for the rules.

    Not for concurrent use: one tick (or one pipe) at a time, as a stream's chunks are applied in order.
    """

    def __init__(self, client: GatewayClient, *, max_message_timesteps: int = defaults.MESSAGE_TIMESTEPS,
                 model: str = "", version: int = 0) -> None:
        if max_message_timesteps < 1:
            raise ValueError("max_message_timesteps must be at least 1")
        self.client = client
        self.max_message_timesteps = max_message_timesteps
        self.model = model
        self.version = version
        self._handles: dict[str, GatewayStream] = {}

    def stream(self, stream_id: str) -> GatewayStream:
        """The gateway's handle on one stream (made at its first use, at offset 0, as `client.stream`)."""
        handle = self._handles.get(stream_id)
        if handle is None:
            handle = self._handles[stream_id] = self.client.stream(stream_id, model=self.model, version=self.version)
        return handle

    @property
    def streams(self) -> Mapping[str, GatewayStream]:
        """Every stream this gateway has a handle on."""
        return dict(self._handles)

    def offset(self, stream_id: str) -> int:
        return self.stream(stream_id).offset

    def start_new(self, stream_id: str) -> None:
        """The stream's next chunk starts a new sequence at offset 0 (`AsyncStream.start_new`)."""
        self.stream(stream_id).start_new()

    async def resume(self, stream_id: str) -> int:
        """Continue the stream where the server stands; returns the offset (`AsyncStream.resume`)."""
        return await self.stream(stream_id).resume()

    async def reset(self, stream_id: str) -> bool:
        """Forget the stream's state now (ResetStream); its handle goes back to offset 0."""
        return await self.stream(stream_id).reset()

    async def end(self, stream_id: str, values: Any = None) -> np.ndarray | None:
        """Finish one stream's sequence (`AsyncStream.end`): with values, send them as its last chunk and
        return their outputs (or raise its error); without, drop the state now."""
        if values is None:
            await self.reset(stream_id)
            return None
        return (await self.send({stream_id: values}, end={stream_id}))[stream_id]

    async def send(self, values: Mapping[str, Any], *, end: Iterable[str] = (),
                   start_new: Iterable[str] = ()) -> GatewayResult:
        """Send one tick, each stream's chunk (`[timesteps, features]`, or 1-D for one feature) in one
        message; returns each stream's outputs or its own error. Streams in `end` end their sequence after
        this chunk; those in `start_new` start a new one with it. A chunk of the wrong shape raises
        InvalidInput before anything is sent."""
        model, max_chunks, max_timesteps = await self._limits()
        work = self._plan_tick(Tick(values, frozenset(end), frozenset(start_new)), model)
        tally = _Tally(list(work), model)
        budget = Budget(self.client.retry)
        while pending := {stream_id: chunks for stream_id, chunks in work.items() if chunks}:
            timeout = budget.attempt_timeout_s()
            heads = [chunks[0] for chunks in pending.values()]
            messages = _messages(heads, max_chunks, max_timesteps)
            answers = await asyncio.gather(*(self._post(message, timeout) for message in messages))
            retries: dict[str, str] = {}
            for message, answer in zip(messages, answers, strict=True):
                self._take(message, answer, work, tally, retries)
            if not retries:
                continue
            wait = budget.next_wait_s()
            if wait is None:
                for stream_id, reason in retries.items():
                    start = work.pop(stream_id)[0].request.start_offset
                    tally.add(stream_id, _Verdict(error=ServerUnavailable(
                        f"stream {stream_id!r}: the chunk at offset {start} got no answer from "
                        f"{self.client.target} within the deadline ({budget.attempts} attempts); last: {reason}",
                        grpc.StatusCode.UNAVAILABLE)))
                continue
            await asyncio.sleep(wait)
        return tally.result()

    async def pipe(self, ticks: Chunks, *, window: int = defaults.PIPE_WINDOW) -> AsyncIterator[GatewayResult]:
        """Stream ticks (mappings of stream id to chunk, or `Tick`s) over one PredictBatchStream call with
        up to `window` messages unanswered; yields each tick's `GatewayResult` in order. A broken call is
        reopened and the unanswered messages resent by offset (see the module's docstring)."""
        if window < 1:
            raise ValueError("window must be at least 1")
        client = self.client
        model, max_chunks, max_timesteps = await self._limits()
        lane = TickLane(self, model, max_chunks, max_timesteps)
        run: Pipe[GatewayResult] = Pipe(lane, window, client.retry,
                                        lambda: client._stub.PredictBatchStream(metadata=client._metadata))
        async for result in run.outputs(_ticks(ticks)):
            yield result

    async def _limits(self) -> tuple[ModelInfo, int, int]:
        """The model, and the most chunks and timesteps per message: the server's limits (ModelInfo), and
        `max_message_timesteps` where it is lower."""
        model = await self.client._model_cached(self.model)
        if model.max_batch_chunks < 1:
            raise ClientError(f"{self.client.target}: the server does not take many chunks per message "
                              "(PredictBatch came with lstm-serve 0.2.0)", grpc.StatusCode.UNIMPLEMENTED)
        timesteps = min(self.max_message_timesteps, model.max_batch_timesteps or self.max_message_timesteps)
        return model, model.max_batch_chunks, timesteps

    def _plan_tick(self, tick: Tick, model: ModelInfo,
                   positions: dict[str, Position] | None = None) -> dict[str, list[_Chunk]]:
        """Every stream's requests for the tick, planned from its handle's position (or from `positions`,
        a pipe's plan ahead of the handles, which it updates). Checks every chunk before planning any."""
        unknown = (set(tick.end) | set(tick.start_new)) - set(tick.values)
        if unknown:
            raise InvalidInput(f"end/start_new name streams with no chunk in the tick: {sorted(unknown)}")
        arrays = {}
        for stream_id, values in tick.values.items():
            try:
                arrays[stream_id] = as_input(values, model)
            except InvalidInput as exc:
                raise InvalidInput(f"stream {stream_id!r}: {exc.message}") from None
        work = {}
        for stream_id, x in arrays.items():
            handle = self.stream(stream_id)
            if positions is None:
                if stream_id in tick.start_new:
                    handle.start_new()
                at = handle.position
            else:
                at = positions.get(stream_id) or handle.position
                if stream_id in tick.start_new:
                    at = Position(0, at.sequence + 1, new_sequence=True)
            work[stream_id] = _plan(handle, x, at, end=stream_id in tick.end, model=model)
            if positions is not None:
                positions[stream_id] = work[stream_id][-1].after
        return work

    async def _post(self, chunks: list[_Chunk], timeout: float) -> pb.PredictBatchResponse | grpc.aio.AioRpcError:
        for chunk in chunks:
            chunk.sends += 1
        try:
            return await self.client._stub.PredictBatch(_message(chunks), timeout=timeout,
                                                        metadata=self.client._metadata)
        except grpc.aio.AioRpcError as exc:
            return exc

    def _take(self, chunks: list[_Chunk], answer: pb.PredictBatchResponse | grpc.aio.AioRpcError,
              work: dict[str, list[_Chunk]], tally: _Tally, retries: dict[str, str]) -> None:
        """One message's answer, into the tick: answered chunks leave `work`, failed streams leave it with
        their error, retryable ones stay (`retries` says why)."""
        policy = self.client.retry
        if isinstance(answer, grpc.aio.AioRpcError):
            if answer.code() in policy.retryable or is_break(answer):
                retries.update((chunk.handle.stream_id, f"{answer.code().name}: {answer.details()}")
                               for chunk in chunks)
                return
            error = rejected(answer, self.client.target, policy.retryable)
            for chunk in chunks:
                work.pop(chunk.handle.stream_id)
                tally.add(chunk.handle.stream_id, _Verdict(error=error))
            return
        for chunk, (result, outputs) in zip(chunks, _results(chunks, answer), strict=True):
            stream_id = chunk.handle.stream_id
            remaining = work[stream_id]
            verdict = _judge(chunk, result, outputs, policy.retryable, functools.partial(_ends, remaining))
            _commit(chunk, result, verdict)
            if verdict.retry is not None:
                retries[stream_id] = verdict.retry
                continue
            tally.add(stream_id, verdict)
            if verdict.error is not None:
                del work[stream_id]
            else:
                remaining.pop(0)
                if verdict.migration is not None:
                    _plan_again(remaining)


def _ends(chunks: list[_Chunk]) -> set[int]:
    return {chunk.end_offset for chunk in chunks}


async def _ticks(ticks: Chunks) -> AsyncIterator[Tick]:
    async for tick in aiter_chunks(ticks):
        yield tick if isinstance(tick, Tick) else Tick(tick)


@dataclass(frozen=True)
class _Message:
    """A pipe's message: its chunks, and the tick it belongs to (every message of a tick shares its tally)."""

    chunks: list[_Chunk]
    tally: _Tally


@dataclass(eq=False)
class TickLane:
    """A gateway's ticks on PredictBatchStream (pipe.py's `Lane`): a tick becomes messages (piece i of
    every stream's chunk in message i, each cut to the server's limits), planned ahead of the handles
    (`positions`); a message's answer is taken whole, or the message resent whole."""

    gateway: AsyncGateway
    model: ModelInfo
    max_chunks: int
    max_timesteps: int
    positions: dict[str, Position] = field(default_factory=dict)
    target: str = field(init=False)
    retryable: frozenset[grpc.StatusCode] = field(init=False)
    finished: _Tally | None = None
    retried: tuple[Piece, list[tuple[pb.PredictResponse, _Verdict]]] | None = None  # the last answer resent
    moved: str | None = None  # why the unanswered messages were planned again (`replanned`)

    def __post_init__(self) -> None:
        self.target = self.gateway.client.target
        self.retryable = self.gateway.client.retry.retryable

    def split(self, item: Any) -> list[tuple[Any, Any]]:
        work = self.gateway._plan_tick(item, self.model, self.positions)
        tally = _Tally(list(work), self.model)
        rounds = max((len(chunks) for chunks in work.values()), default=1)
        planned = []
        for number in range(rounds):
            heads = [chunks[number] for chunks in work.values() if number < len(chunks)]
            for chunks in _messages(heads, self.max_chunks, self.max_timesteps):
                planned.append((_message(chunks), _Message(chunks, tally)))
        return planned

    def take(self, piece: Piece, response: Any, unanswered: deque[Piece]) -> str | None:
        message: _Message = piece.data
        if response.HasField("error"):  # the whole message refused (a limit, the queue): nothing applied
            code = status_from_number(response.error.code)
            if code in self.retryable:
                return f"the message: {code.name}: {response.error.message}"
            raise RequestRejected(f"{self.target} refused a whole message of {len(message.chunks)} chunks: "
                                  f"{code.name}: {response.error.message}", code)
        judged = []
        for chunk in message.chunks:
            chunk.sends = piece.sends
        for chunk, (result, outputs) in zip(message.chunks, _results(message.chunks, response), strict=True):
            ends = functools.partial(self._unanswered_ends, chunk, unanswered)
            judged.append((result, _judge(chunk, result, outputs, self.retryable, ends)))
        retry = next((verdict.retry for _, verdict in judged if verdict.retry is not None), None)
        if retry is not None:
            self.retried = (piece, judged)
            return retry
        self._commit(message, judged)
        moved = {chunk.handle for chunk, (_, verdict) in zip(message.chunks, judged, strict=True)
                 if verdict.migration is not None}
        if moved:
            self._plan_again(moved, list(unanswered)[1:])
        return None

    def _plan_again(self, moved: set[GatewayStream], later: list[Piece]) -> None:
        """Streams the server moved to another version stand at their answers' offsets: their chunks in the
        messages after this one are planned again from there, and those messages resent on a new call."""
        for handle in moved:
            chunks = [chunk for piece in later for chunk in piece.data.chunks if chunk.handle is handle]
            _plan_again(chunks)
            self.positions[handle.stream_id] = chunks[-1].after if chunks else handle.position
            if chunks:
                self.moved = f"stream {handle.stream_id!r} moved to another model version; the messages in " \
                             "flight are sent again with its new offsets"
        for piece in later:
            piece.request = _message(piece.data.chunks)

    def replanned(self) -> str | None:
        moved, self.moved = self.moved, None
        return moved

    def finish(self) -> GatewayResult:
        assert self.finished is not None
        result, self.finished = self.finished.result(), None
        return result

    def settle(self, piece: Piece) -> bool:
        """The deadline is spent and the last answer to `piece` had chunks failing with a retryable error:
        those streams get ServerUnavailable, the others their outputs."""
        if self.retried is None or self.retried[0] is not piece:
            return False
        judged = [(result, verdict if verdict.retry is None else _Verdict(error=ServerUnavailable(
            f"{verdict.retry} (retries ran out within the deadline, {piece.sends} attempts)",
            grpc.StatusCode.UNAVAILABLE))) for result, verdict in self.retried[1]]
        self._commit(piece.data, judged)
        return True

    def unanswered(self, piece: Piece, reason: str) -> ClientError:
        chunks = piece.data.chunks
        names = ", ".join(repr(chunk.handle.stream_id) for chunk in chunks[:3]) + (", ..." if len(chunks) > 3 else "")
        return ServerUnavailable(f"a message of {len(chunks)} chunks ({names}) got no answer from {self.target} "
                                 f"within the deadline ({piece.sends} attempts); last: {reason}",
                                 grpc.StatusCode.UNAVAILABLE)

    def _commit(self, message: _Message, judged: list[tuple[pb.PredictResponse, _Verdict]]) -> None:
        self.retried = None
        for chunk, (result, verdict) in zip(message.chunks, judged, strict=True):
            _commit(chunk, result, verdict)
            message.tally.add(chunk.handle.stream_id, verdict)
        self.finished = message.tally

    @staticmethod
    def _unanswered_ends(chunk: _Chunk, unanswered: deque[Piece]) -> set[int]:
        return {other.end_offset for piece in unanswered for other in piece.data.chunks
                if other.handle is chunk.handle}
