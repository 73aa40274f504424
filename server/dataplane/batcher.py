"""The batcher: gathers chunks of many streams into batches for one model call each.

A batch is formed as soon as a batch slot is free, from whatever is waiting plus what arrives
within `max_delay_s` (or, while several callers are served at once, `busy_delay_s`), up to
`max_batch` chunks. Up to `max_in_flight` batches run at once, so one batch's Redis round trips
overlap another's model call. Without a delay, a batch that finds another one in its model call
could not run its own before that one ends: it keeps growing until it would reach the model just as
the model is free (the processor's estimate, from recent calls), or until it is full, so batches
follow the load, and a lone chunk on an idle model starts at once. A batch gives its slot back once
its saves are done, and its callers are answered only after the next batch has started: their
replies (protobuf, writes, on the event loop) then overlap that batch's model call instead of
holding it back. Chunks of one stream never share a batch and never run in two batches at once
(each needs the state the previous one leaves), and they keep their arrival order: a stream's later
chunk waits in the queue, in place, until its earlier one is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from server import metrics
from server.errors import (
    ServiceError,
    internal_error,
    queue_full,
    queue_full_for_batch,
    shutting_down,
    stream_kept_changing,
)
from server.types import BatchResult, Chunk, Conflict, Prediction, StreamKey

log = logging.getLogger(__name__)

ProcessBatch = Callable[[Sequence[Chunk]], Awaitable[list[BatchResult]]]
# A chunk whose slot another writer changed under it this many times in a row is refused (ABORTED).
MAX_CONFLICTS = 5


@dataclass(slots=True)
class _Waiting:
    chunk: Chunk
    future: asyncio.Future[Prediction]
    conflicts: int = field(default=0)
    queued_at: float = field(default_factory=time.monotonic)  # for the queue-wait histogram


class Batcher:
    def __init__(
        self,
        process: ProcessBatch,
        *,
        max_batch: int,
        max_delay_s: float,
        max_in_flight: int,
        max_queued: int,
        busy_delay_s: float = 0.0,
        max_conflicts: int = MAX_CONFLICTS,
        model_free_in: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._process = process
        # Seconds a batch started now would wait for the model (0 or less: none); `wake` when the model is free.
        self._model_free_in = model_free_in
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.busy_delay_s = busy_delay_s
        self._several_callers = False  # whether the last batch held chunks of more than one message
        self.max_in_flight = max_in_flight
        self.max_conflicts = max_conflicts
        self.max_queued = max_queued
        self._queue: deque[_Waiting] = deque()
        # Set when a chunk arrives or a batch finishes: either can make a new batch possible.
        self._changed = asyncio.Event()
        # Streams with a chunk in a running batch, as (tenant, stream_id): invariant 13, docs/invariants.md.
        self._busy: set[StreamKey] = set()
        self._running: set[asyncio.Task[None]] = set()  # every batch's task, until its callers are answered
        self._batches = 0  # batches holding one of the max_in_flight slots: until their saves are done
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight_chunks = 0
        self._queued_now = lambda: len(self._queue)
        metrics.watch_batcher(self._queued_now, lambda: self._in_flight_chunks)

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    def start(self) -> None:
        self._task = asyncio.create_task(self._serve(), name="batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._running:
            await asyncio.wait(self._running, timeout=10)
        for waiting in self._queue:
            if not waiting.future.done():
                waiting.future.set_exception(shutting_down())
                # Its caller may be gone (a broken stream): mark the exception seen, so asyncio does not
                # log "Future exception was never retrieved" at exit. A caller still waiting gets it anyway.
                waiting.future.exception()
        self._queue.clear()
        metrics.unwatch_batcher(self._queued_now)

    def submit(self, chunk: Chunk) -> asyncio.Future[Prediction]:
        """Queue a chunk; the future gets its Prediction or ServiceError. No task per chunk: cheap.

        Raises RESOURCE_EXHAUSTED when `max_queued` chunks already wait (invariant 12): a burst is
        refused at once rather than held in memory without bound."""
        if not self._room_for(1):
            metrics.CHUNKS.labels("RESOURCE_EXHAUSTED").inc()
            raise queue_full(self.max_queued)
        # The loop is looked up once: on Python 3.11 every get_running_loop() makes a getpid() system call.
        loop = self._loop or self._bind_loop()
        future: asyncio.Future[Prediction] = loop.create_future()
        self._queue.append(_Waiting(chunk, future))
        self._changed.set()
        return future

    def submit_many(self, chunks: Sequence[Chunk]) -> list[asyncio.Future[Prediction]]:
        """Queue the chunks of one message, all or none (invariants 12 and 17): a message that does not fit
        beside what already waits (`max_queued`) is refused whole with RESOURCE_EXHAUSTED, so no part of it is
        applied. Chunks of one stream keep their order, as separate submits would."""
        self.check_room(len(chunks))
        loop = self._loop or self._bind_loop()
        futures = [loop.create_future() for _ in chunks]
        queued_at = time.monotonic()
        self._queue.extend(_Waiting(chunk, future, 0, queued_at) for chunk, future in zip(chunks, futures, strict=True))
        self._changed.set()
        return futures

    def check_room(self, chunks: int) -> None:
        """Raises RESOURCE_EXHAUSTED unless a message of `chunks` chunks fits in the queue now."""
        if not self._room_for(chunks):
            metrics.CHUNKS.labels("RESOURCE_EXHAUSTED").inc(chunks)
            raise queue_full_for_batch(chunks, len(self._queue), self.max_queued)

    def _room_for(self, chunks: int) -> bool:
        """Whether `chunks` more fit beside those waiting, once chunks nobody waits for are dropped."""
        if len(self._queue) + chunks > self.max_queued:
            self._drop_abandoned()
        return len(self._queue) + chunks <= self.max_queued

    def abandon(self, futures: Sequence[asyncio.Future[Prediction]]) -> None:
        """Nobody will read these answers (a broken stream): drop their chunks that have not started.

        A chunk in a running batch finishes (applied once or not at all); the ones still queued are
        removed now, so they never run later and their memory is freed at once (invariants 11, 12)."""
        live = False
        for future in futures:
            if not future.done():
                future.cancel()
                live = True
            elif future.cancelled():
                live = True  # cancelled by another model's batcher: its chunk may wait here
            else:
                future.exception()  # retrieved: an unread error is not worth asyncio's "never retrieved" log
        if live:
            self._drop_abandoned()

    def _drop_abandoned(self) -> None:
        kept = deque(w for w in self._queue if not w.future.done())
        metrics.CHUNKS.labels("dropped").inc(len(self._queue) - len(kept))
        self._queue = kept

    async def predict(self, chunk: Chunk) -> Prediction:
        return await self.submit(chunk)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self._batches >= self.max_in_flight or not self._queue:
                self._changed.clear()
                await self._changed.wait()
            # While several callers are served at once, a batch waits `busy_delay_s` for more chunks: the callers
            # answered last send their next ones within it (their answers went out as this batch formed), so batches
            # hold most of the callers' chunks instead of alternating halves, and the model's cost per call is
            # shared by more chunks. A lone caller never waits: nobody else's chunk would come.
            delay = self.max_delay_s or (self.busy_delay_s if self._several_callers else 0.0)
            # Without a delay: a batch slot free while another batch is in its model call (max_in_flight above 1)
            # would start a batch that could not run its own call before that one ends, so it grows meanwhile and
            # starts when it would reach the model as the model becomes free (its loads and rules overlap the end of
            # that call), or when it is full. Batch sizes follow the load, and an idle model takes a lone chunk at
            # once. With a delay, the delay decides instead (measured better together with it: the two waits in a
            # row left the model idle for the delay after every call).
            while delay == 0 and len(self._queue) < self.max_batch \
                    and (wait := self._model_free_in()) > 0:
                self._changed.clear()
                timer = loop.call_later(wait, self._changed.set)
                await self._changed.wait()
                timer.cancel()
            if delay > 0:
                deadline = loop.time() + delay
                while len(self._queue) < self.max_batch and (left := deadline - loop.time()) > 0:
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), left)
            batch = self._take_batch()
            if not batch:  # everything waiting belongs to streams in a running batch
                self._changed.clear()
                await self._changed.wait()
                continue
            self._busy.update(w.chunk.stream for w in batch if w.chunk.stream_id is not None)
            self._batches += 1
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def wake(self) -> None:
        """Something a waiting batch depends on changed (the model became free)."""
        self._changed.set()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)

    def _take_batch(self) -> list[_Waiting]:
        """Up to max_batch chunks of distinct, idle streams, oldest first; the rest keep their order."""
        batch: list[_Waiting] = []
        kept: deque[_Waiting] = deque()
        streams: set[StreamKey | None] = set(self._busy)
        while self._queue:
            waiting = self._queue.popleft()
            if waiting.future.done():
                # The caller went away before its chunk started (a cancelled call, a broken stream):
                # drop it, never run it later (invariant 11, docs/invariants.md).
                metrics.CHUNKS.labels("dropped").inc()
                continue
            stream = waiting.chunk.stream  # None: one-shot inference, never waits for another chunk
            if len(batch) >= self.max_batch or (stream is not None and stream in streams):
                kept.append(waiting)
                if stream is not None:
                    streams.add(stream)  # later chunks of this stream must stay behind it
                continue
            if stream is not None:
                streams.add(stream)
            batch.append(waiting)
        self._queue = kept
        return batch

    async def _run(self, batch: list[_Waiting]) -> None:
        answers: list[tuple[_Waiting, Prediction | ServiceError]] = []
        try:
            answers = await self._settle(batch)
        finally:
            # Saved (or failed): the batch's streams and its slot are free for the next batch.
            self._busy.difference_update(w.chunk.stream for w in batch)
            self._batches -= 1
            self._changed.set()
        try:
            if self._queue:
                await asyncio.sleep(0)  # the batcher forms the next batch and it runs up to its model call
        finally:
            for waiting, outcome in answers:
                if waiting.future.done():
                    continue
                if isinstance(outcome, ServiceError):
                    waiting.future.set_exception(outcome)
                else:
                    waiting.future.set_result(outcome)

    async def _settle(self, batch: list[_Waiting]) -> list[tuple[_Waiting, Prediction | ServiceError]]:
        """Run the batch; conflicted chunks go back in the queue, the others' outcomes are returned."""
        metrics.BATCH_SIZE.observe(len(batch))
        loop = self._loop or self._bind_loop()
        started = loop.time()
        now = time.monotonic()
        now_ns = time.monotonic_ns()
        waits: dict[float, int] = {}  # chunks by when they were queued (a message's share one time)
        for waiting in batch:
            waits[waiting.queued_at] = waits.get(waiting.queued_at, 0) + 1
            if waiting.chunk.times is not None:
                waiting.chunk.times.batch_began(now_ns)
        self._several_callers = len(waits) > 1  # a message's chunks share their queueing time
        metrics.observe_counted(metrics.QUEUE_WAIT_SECONDS, {now - queued: count for queued, count in waits.items()})
        self._in_flight_chunks += len(batch)
        try:
            results = await self._process([w.chunk for w in batch])
        except asyncio.CancelledError:
            results = [shutting_down()] * len(batch)
        except ServiceError as exc:
            results = [exc] * len(batch)
        except Exception as exc:  # a bug must fail this batch's callers, never the batcher itself
            log.exception("batch failed")
            results = [internal_error(str(exc))] * len(batch)
        finally:
            self._in_flight_chunks -= len(batch)
        metrics.BATCH_SECONDS.observe(loop.time() - started)
        finished_ns = time.monotonic_ns()
        retry: list[_Waiting] = []
        answers: list[tuple[_Waiting, Prediction | ServiceError]] = []
        applied = replayed = timesteps = 0  # counted once per batch: a labelled counter costs a lookup and a lock
        tenants: dict[tuple[str, str], int] = {}  # chunks per tenant and outcome, likewise
        for waiting, result in zip(batch, results, strict=True):
            chunk = waiting.chunk
            if chunk.times is not None:
                chunk.times.batch_finished = finished_ns
            if isinstance(result, Conflict):
                metrics.CONFLICTS.inc()
                waiting.conflicts += 1
                if waiting.conflicts <= self.max_conflicts:
                    retry.append(waiting)
                    continue
                result = stream_kept_changing(chunk.stream_id)
            if isinstance(result, ServiceError):
                metrics.CHUNKS.labels(result.code.name).inc()
                code = result.code.name
            else:
                code = "OK"
                if result.replayed:
                    replayed += 1
                else:
                    applied += 1
                    timesteps += len(chunk.values)
            if chunk.tenant:
                tenants[chunk.tenant, code] = tenants.get((chunk.tenant, code), 0) + 1
            answers.append((waiting, result))
        for (tenant, code), count in tenants.items():
            metrics.TENANT_CHUNKS.labels(tenant, code).inc(count)
        if applied:
            metrics.CHUNKS.labels("ok").inc(applied)
            metrics.TIMESTEPS.inc(timesteps)
        if replayed:
            metrics.CHUNKS.labels("replayed").inc(replayed)
        # Conflicted chunks go back in front, in their order, ahead of their streams' later chunks.
        self._queue.extendleft(reversed(retry))
        return answers
