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
from server.dataplane.state_io import live_slot, replace_slot
from server.errors import (
    ServiceError,
    invalid_argument,
    model_not_found,
    model_version_unavailable,
    saved_by_other_model,
    slot_from_newer_release,
    slot_unreadable,
    slot_wrong_type,
    tenant_rate_exceeded,
)
from server.model.state_layout import StateLayout
from server.security.limits import ChunkRate
from server.state.formats import RecordFormat
from server.state.live import LiveStreams
from server.state.record import NEWEST_FORMAT, CorruptRecord, NewerRecord, fingerprint_bytes
from server.state.store import StateStore, WrongType
from server.types import Chunk, ModelDescription, Prediction, Runner, StreamState, StreamStatus

# The one model this server hosts is its version 1 (issue 25 brings a repository of models and versions).
HOSTED_VERSIONS = (1,)
# The largest offset SetStreamState takes: a record holds a uint64, and chunks add to it.
MAX_SET_OFFSET = 2**62


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
        # State out and in (invariant 15): the slot's tensors by name, and what a set record carries.
        self._state_ttl_ms = policy.state_ttl_ms
        self._fingerprint = fingerprint_bytes(runner.description.fingerprint)
        self.state_layout = StateLayout(runner.description.recurrent_layers)
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

    def resolve_model(self, name: str, version: int) -> tuple[str, int]:
        """The model and version a request names ("" and 0: the only one, its newest), or NOT_FOUND naming
        what exists. One server, one model, version 1, for now: a repository lookup replaces this (issue 25)."""
        hosted = self.model.name
        if name not in ("", hosted):
            raise model_not_found(name, [hosted])
        if version != 0 and version not in HOSTED_VERSIONS:
            raise model_version_unavailable(hosted, version, list(HOSTED_VERSIONS))
        return hosted, version or HOSTED_VERSIONS[-1]

    async def stream_state(self, stream_id: str, model: str = "", model_version: int = 0,
                           time_remaining: float | None = None, tenant: str = "") -> StreamState:
        """The stream's recurrent state as named tensors, and its offset (GetStreamState, invariant 15):
        NOT_FOUND for a stream without state; a slot this model cannot continue gets a chunk's error."""
        name, version = self.resolve_model(model, model_version)
        slot = await live_slot(self.store, stream_id, self.deadline(time_remaining), tenant)
        if slot.fingerprint != self._fingerprint:
            raise saved_by_other_model(stream_id, slot.fingerprint.hex(), self._fingerprint.hex())
        if slot.state.size != self.state_layout.state_size:
            raise slot_unreadable(stream_id, f"the saved state has {slot.state.size} values, the model needs "
                                  f"{self.state_layout.state_size}")
        return StreamState(stream_id, slot.offset, self.state_layout.split(slot.state), name, version)

    async def set_stream_state(self, state: StreamState, time_remaining: float | None = None, tenant: str = ""
                               ) -> tuple[int, int]:
        """Replace the stream's state and offset in one compare-and-set (SetStreamState, invariant 15): its next
        chunk continues from them. Everything is checked before anything is read or written (INVALID_ARGUMENT
        naming the field, NOT_FOUND for a model or version not hosted). Returns the offset and model version."""
        _, version = self.resolve_model(state.model, state.model_version)
        vector = self.state_layout.join(state.tensors)
        if state.offset > MAX_SET_OFFSET:
            raise invalid_argument("offset", f"is {state.offset}; at most {MAX_SET_OFFSET}")
        await replace_slot(self.store, state.stream_id, vector, state.offset, self._fingerprint,
                           ttl_ms=self._state_ttl_ms, deadline=self.deadline(time_remaining), tenant=tenant,
                           live=self._live)
        return state.offset, version
