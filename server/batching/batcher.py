"""The batcher: gathers chunks of many streams into batches for one model call each.

A batch is formed from whatever is waiting when the previous batch finishes, plus what arrives
within `max_delay_s`, up to `max_batch` chunks. Chunks of one stream never share a batch (each
needs the state the previous one leaves) and keep their arrival order: a stream's later chunk
waits in the queue, in place, for the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc

from server.errors import ServiceError
from server.types import Chunk, Prediction

log = logging.getLogger(__name__)


class Conflict:
    """A batch result meaning: the slot changed under this chunk (another replica); run it again."""


CONFLICT = Conflict()
BatchResult = Prediction | ServiceError | Conflict
ProcessBatch = Callable[[Sequence[Chunk]], Awaitable[list[BatchResult]]]


@dataclass(slots=True)
class _Waiting:
    chunk: Chunk
    future: asyncio.Future[Prediction]
    conflicts: int = field(default=0)


class Batcher:
    def __init__(
        self, process: ProcessBatch, *, max_batch: int = 64, max_delay_s: float = 0.001, max_conflicts: int = 5
    ) -> None:
        self._process = process
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_conflicts = max_conflicts
        self._queue: deque[_Waiting] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._serve(), name="batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for waiting in self._queue:
            if not waiting.future.done():
                waiting.future.set_exception(ServiceError(grpc.StatusCode.UNAVAILABLE, "server is shutting down"))
        self._queue.clear()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def predict(self, chunk: Chunk) -> Prediction:
        future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(chunk, future))
        self._arrived.set()
        return await future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self.max_delay_s
            while len(self._queue) < self.max_batch and (left := deadline - loop.time()) > 0:
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), left)
            batch = self._take_batch()
            if batch:
                await self._run(batch)

    def _take_batch(self) -> list[_Waiting]:
        """Up to max_batch chunks of distinct streams, oldest first; the rest keep their order."""
        batch: list[_Waiting] = []
        kept: deque[_Waiting] = deque()
        streams: set[str] = set()
        while self._queue:
            waiting = self._queue.popleft()
            if waiting.future.done():  # the caller went away before its chunk was run
                continue
            stream_id = waiting.chunk.stream_id
            if len(batch) >= self.max_batch or (stream_id is not None and stream_id in streams):
                kept.append(waiting)
                if stream_id is not None:
                    streams.add(stream_id)  # later chunks of this stream must stay behind it
                continue
            if stream_id is not None:
                streams.add(stream_id)
            batch.append(waiting)
        self._queue = kept
        return batch

    async def _run(self, batch: list[_Waiting]) -> None:
        try:
            results = await self._process([w.chunk for w in batch])
        except ServiceError as exc:
            results = [exc] * len(batch)
        except Exception as exc:  # a bug must fail this batch's callers, never the batcher itself
            log.exception("batch failed")
            results = [ServiceError(grpc.StatusCode.INTERNAL, f"internal error: {exc}")] * len(batch)
        retry: list[_Waiting] = []
        for waiting, result in zip(batch, results, strict=True):
            if isinstance(result, Conflict):
                waiting.conflicts += 1
                if waiting.conflicts <= self.max_conflicts:
                    retry.append(waiting)
                    continue
                result = ServiceError(
                    grpc.StatusCode.ABORTED,
                    f"stream {waiting.chunk.stream_id!r} kept changing under this chunk (another writer); retry",
                )
            if waiting.future.done():
                continue
            if isinstance(result, ServiceError):
                waiting.future.set_exception(result)
            else:
                waiting.future.set_result(result)
        # Conflicted chunks go back in front, in their order, ahead of their streams' later chunks.
        self._queue.extendleft(reversed(retry))
