"""The protocol-agnostic data plane every servicer calls: predict, reset, inspect, describe.

It owns the batcher, the state store and the model runner, and wires them in the one direction
the data flows: batcher -> store -> model -> store -> reply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence

from server import metrics
from server.dataplane.batcher import Batcher
from server.dataplane.processor import BatchProcessor, StreamPolicy
from server.errors import ServiceError, slot_from_newer_release, slot_wrong_type, tenant_rate_exceeded
from server.security.limits import ChunkRate
from server.state.formats import RecordFormat
from server.state.live import LiveStreams
from server.state.record import NEWEST_FORMAT, CorruptRecord, NewerRecord
from server.state.store import StateStore, WrongType
from server.types import Chunk, ModelDescription, Prediction, Runner, StreamStatus


class DataPlane:
    def __init__(
        self,
        runner: Runner,
        store: StateStore,
        policy: StreamPolicy,
        *,
        max_batch: int,
        max_delay_s: float,
        max_in_flight: int,
        max_queued: int,
        chunk_rate: ChunkRate | None = None,
        live: LiveStreams | None = None,
        record_format: RecordFormat | None = None,
    ) -> None:
        self.runner = runner
        self.store = store
        self.record_format = record_format  # which record format saves use (rolling upgrades)
        self._format_refresh: asyncio.Task[None] | None = None
        self.request_deadline_s = policy.request_deadline_s
        # Per-tenant limits (invariants 12 and 13): chunks/s in this process, live streams in Redis.
        self._chunk_rate = chunk_rate
        self._live = live
        self._processor = BatchProcessor(runner, store, policy, live, record_format)
        self._batcher = Batcher(
            self._processor, max_batch=max_batch, max_delay_s=max_delay_s, max_in_flight=max_in_flight,
            max_queued=max_queued,
        )

    @property
    def model(self) -> ModelDescription:
        return self.runner.description

    @property
    def max_chunk_timesteps(self) -> int:
        return self.runner.max_chunk_timesteps

    def start(self) -> None:
        self._batcher.start()
        if self.record_format is not None:
            self._format_refresh = asyncio.create_task(self.record_format.track(), name="record-format")

    async def stop(self) -> None:
        if self._format_refresh is not None:
            self._format_refresh.cancel()
        await self._batcher.stop()
        self._processor.close()
        self.runner.close()
        await self.store.close()

    def deadline(self, time_remaining: float | None) -> float:
        """The time.monotonic() by which a call must be answered, from its gRPC `time_remaining()` (None:
        no deadline), capped by --request-deadline-s. A tenth of it, at most 0.1 s, is left for the answer
        to travel back, so the caller hears what happened rather than DEADLINE_EXCEEDED (invariant 9)."""
        budget = self.request_deadline_s if time_remaining is None else min(time_remaining, self.request_deadline_s)
        return time.monotonic() + budget - min(0.1, budget / 10)

    async def predict(self, chunk: Chunk, time_remaining: float | None = None) -> Prediction:
        """Run one validated chunk; raises ServiceError with the status the caller should see."""
        return await self.submit(chunk, time_remaining)

    def submit(self, chunk: Chunk, time_remaining: float | None = None) -> asyncio.Future[Prediction]:
        """Queue one validated chunk without waiting: streaming edges keep many in flight.

        Raises ServiceError (RESOURCE_EXHAUSTED) at once when the chunk's tenant is over its chunks/s."""
        if (over := self._over_rate(chunk)) is not None:
            raise over
        if chunk.deadline is None:
            chunk = dataclasses.replace(chunk, deadline=self.deadline(time_remaining))
        return self._batcher.submit(chunk)

    def submit_many(self, chunks: Sequence[Chunk | ServiceError]
                    ) -> list[asyncio.Future[Prediction] | ServiceError]:
        """Queue the valid chunks of one message (each with its deadline set) without waiting; an invalid one
        (a ServiceError from validation) and one over its tenant's chunks/s come back as their own error.
        Raises ServiceError (RESOURCE_EXHAUSTED) when the message does not fit in the queue: nothing is queued."""
        answers: list[asyncio.Future[Prediction] | ServiceError] = list(chunks)  # type: ignore[arg-type]
        valid: list[Chunk] = []
        positions: list[int] = []
        for index, chunk in enumerate(chunks):
            if isinstance(chunk, ServiceError):
                continue
            if (over := self._over_rate(chunk)) is not None:
                answers[index] = over
                continue
            valid.append(chunk)
            positions.append(index)
        for index, future in zip(positions, self._batcher.submit_many(valid), strict=True):
            answers[index] = future
        return answers

    def _over_rate(self, chunk: Chunk) -> ServiceError | None:
        """RESOURCE_EXHAUSTED when the chunk's tenant is over its chunks/s (a token is taken otherwise)."""
        if self._chunk_rate is None or not chunk.tenant or self._chunk_rate.allow(chunk.tenant):
            return None
        metrics.TENANT_CHUNKS.labels(chunk.tenant, "RESOURCE_EXHAUSTED").inc()
        return tenant_rate_exceeded(chunk.tenant, self._chunk_rate.limit(chunk.tenant))

    def abandon(self, answers: Sequence[asyncio.Future[Prediction]]) -> None:
        """The caller is gone (a broken stream): chunks not yet started are dropped, never run later."""
        self._batcher.abandon(answers)

    async def reset_stream(self, stream_id: str, time_remaining: float | None = None, tenant: str = "") -> bool:
        """Forget the stream's slot (Keras reset_states for this stream alone); True if the stream existed:
        an ended stream, whose record is kept only for retries of its last chunk, did not (GetStream agrees)."""
        deadline = self.deadline(time_remaining)
        existed = await self.store.delete(stream_id, deadline, tenant)
        if self._live is not None and tenant:
            await self._live.forget(tenant, stream_id, deadline)
        return existed

    async def stream_status(self, stream_id: str, time_remaining: float | None = None, tenant: str = ""
                            ) -> StreamStatus:
        slot, ttl_ms = await self.store.inspect(stream_id, self.deadline(time_remaining), tenant)
        if isinstance(slot, WrongType):
            raise slot_wrong_type(stream_id, slot.key, slot.redis_type)
        if isinstance(slot, NewerRecord):
            raise slot_from_newer_release(stream_id, slot.format, NEWEST_FORMAT)
        if slot is None or isinstance(slot, CorruptRecord) or slot.ended:
            return StreamStatus(stream_id, exists=False)
        return StreamStatus(
            stream_id=stream_id,
            exists=True,
            offset=slot.offset,
            updated_unix_ms=slot.updated_unix_ms,
            expires_in_ms=max(ttl_ms, 0),
            model_fingerprint=slot.fingerprint.hex(),
        )
