"""The protocol-agnostic data plane every servicer calls: predict, reset, inspect, describe.

It owns the state store and, per served model, a batcher and a batch processor over the model's versions
(server/dataplane/versions.py), and wires them in the one direction the data flows: batcher -> store ->
model -> store -> reply. Each model has its own namespace of stream ids (StateStore.namespaced), except the
model of `--model FILE`, whose streams keep the keys of a server without a repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from server import metrics
from server.dataplane.batcher import Batcher
from server.dataplane.processor import BatchProcessor, StreamPolicy
from server.dataplane.state_io import live_slot, replace_slot
from server.dataplane.versions import READY, ModelControl, ModelVersions, ServingVersion, VersionStatus
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
    version_retired,
)
from server.model.state_layout import StateLayout
from server.security.limits import ChunkRate
from server.state.formats import RecordFormat
from server.state.live import LiveStreams
from server.state.live_versions import LiveStreamsByVersion
from server.state.record import NEWEST_FORMAT, CorruptRecord, NewerRecord
from server.state.store import StateStore, WrongType, now_unix_ms
from server.types import Chunk, ModelDescription, Prediction, Runner, StreamState, StreamStatus

# The largest offset SetStreamState takes: a record holds a uint64, and chunks add to it.
MAX_SET_OFFSET = 2**62

# Accepted for the server's only model whatever its name (Triton's clients often say "default").
MODEL_ALIAS = "default"

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServedModel:
    """One model: its versions, its stream namespace, and its own batcher and batch processor."""

    name: str
    versions: ModelVersions
    store: StateStore  # the model's stream namespace
    processor: BatchProcessor
    batcher: Batcher
    # Shared by every version: a version with other shapes is refused when it loads (server/app/models.py).
    input_features: int
    output_size: int
    per_timestep_outputs: bool
    live_versions: LiveStreamsByVersion | None = None  # the metric of live streams per version

    @property
    def description(self) -> ModelDescription:
        """The newest version's (or, while none is ready, the newest serving one's)."""
        newest = self.versions.newest()
        if newest is None:
            serving = self.versions.serving()
            if not serving:
                raise model_version_unavailable(self.name, 0, [])
            newest = serving[-1]
        return newest.description

    def describe(self, version: int) -> tuple[int, ModelDescription]:
        """A version's number and description (0: the newest); NOT_FOUND naming the ready ones."""
        if not version:
            newest = self.versions.newest()
            if newest is None:
                raise model_version_unavailable(self.name, 0, [])
            return newest.number, newest.description
        found = self.versions.get(version)
        if found is None:
            raise model_version_unavailable(self.name, version, self.versions.ready_numbers())
        return found.number, found.description


class DataPlane:
    def __init__(
        self,
        store: StateStore,
        policy: StreamPolicy,
        *,
        max_batch: int,
        max_delay_s: float,
        max_in_flight: int,
        max_queued: int,
        max_chunk_timesteps: int,
        busy_delay_s: float = 0.0,
        chunk_rate: ChunkRate | None = None,
        live: LiveStreams | None = None,
        record_format: RecordFormat | None = None,
        live_streams_interval_s: float = 0.0,
    ) -> None:
        self.store = store
        self.record_format = record_format  # which record format saves use (rolling upgrades)
        self._format_refresh: asyncio.Task[None] | None = None
        self.request_deadline_s = policy.request_deadline_s
        self.max_chunk_timesteps = max_chunk_timesteps
        self._policy = policy
        self._batching = {"max_batch": max_batch, "max_delay_s": max_delay_s, "max_in_flight": max_in_flight,
                          "max_queued": max_queued, "busy_delay_s": busy_delay_s}
        # Per-tenant limits (invariants 12 and 13): chunks/s in this process, live streams in Redis.
        self._chunk_rate = chunk_rate
        self._live = live
        # Live streams per model version, counted in Redis this often (0: not counted).
        self._live_streams_interval_s = live_streams_interval_s
        self._live_count: asyncio.Task[None] | None = None
        self._models: dict[str, ServedModel] = {}
        self._started = False
        # Loads and unloads versions on request (server/app/models.py); None without a model repository.
        self.control: ModelControl | None = None

    # The models served.

    def add_model(self, name: str, first: Runner, number: int = 1, *, namespace: str | None = None) -> ServedModel:
        """Serve a model, starting with one version; `namespace` "" keeps the keys of a server without a
        repository (--model FILE), None gives the model its own (its name)."""
        namespace = name if namespace is None else namespace
        versions = ModelVersions(name)
        store = self.store.namespaced(namespace)
        live_versions = (LiveStreamsByVersion(self.store, name, self._policy.state_ttl_ms)
                         if self._live_streams_interval_s > 0 else None)
        processor = BatchProcessor(versions, store, self._policy, self._live, self.record_format, namespace,
                                   lambda: self.control, live_versions)
        batcher = Batcher(processor, model_free_in=processor.model_schedule.free_in,  # type: ignore[arg-type]
                          **self._batching)
        processor.on_model_free = batcher.wake
        description = first.description
        served = ServedModel(name, versions, store, processor, batcher, description.input_features,
                             description.output_size, description.per_timestep_outputs, live_versions)
        versions.add(ServingVersion(number, first))
        self._models[name] = served
        if self._started:
            batcher.start()
        return served

    def served(self, name: str = "") -> ServedModel:
        """The model a request names (empty, or Triton's "default": the only one); NOT_FOUND naming the others."""
        found = self._models.get(name)
        if found is not None:
            return found
        if name in ("", MODEL_ALIAS) and len(self._models) == 1:
            return next(iter(self._models.values()))
        raise model_not_found(name, sorted(self._models))

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def version_status(self) -> list[VersionStatus]:
        rows = [row for name in sorted(self._models) for row in self._models[name].versions.status()]
        if self.control is not None:
            rows += self.control.status()
        return sorted(rows, key=lambda row: (row.model, row.number))

    @property
    def model(self) -> ModelDescription:
        """The only model's newest version (a server of one model; the edges name a model with `served`)."""
        return self.served().description

    def start(self) -> None:
        self._started = True
        for served in self._models.values():
            served.batcher.start()
        if self.record_format is not None:
            self._format_refresh = asyncio.create_task(self.record_format.track(), name="record-format")
        if self._live_streams_interval_s > 0:
            self._live_count = asyncio.create_task(self._count_live_streams(), name="live-streams")

    async def stop(self) -> None:
        if self._format_refresh is not None:
            self._format_refresh.cancel()
        for served in self._models.values():
            await served.batcher.stop()
        if self._live_count is not None:
            self._live_count.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._live_count
            await self.count_live_streams(budget_s=1.0)  # what the last batches ran, before the store closes
        for served in self._models.values():
            served.processor.close()
            for version in served.versions.serving():
                version.runner.close()
        await self.store.close()

    async def _count_live_streams(self) -> None:
        while True:
            await asyncio.sleep(self._live_streams_interval_s)
            await self.count_live_streams()

    async def count_live_streams(self, budget_s: float | None = None) -> None:
        """Write what this process's batches ran to each model's live-stream sets, and set the gauges from the
        counts (server/state/live_versions.py); Redis not answering leaves them as they were."""
        deadline = time.monotonic() + (self.request_deadline_s if budget_s is None else budget_s)
        for served in list(self._models.values()):
            if served.live_versions is None:
                continue
            numbers = {v.number for v in served.versions.serving()}
            try:
                counts = await served.live_versions.count(numbers, deadline)
            except ServiceError as exc:  # Redis unreachable: the health check says so; try again next time
                log.debug("live streams not counted", extra={"model": served.name, "reason": exc.message})
                continue
            except Exception:  # a metric must never stop the server: say why and go on
                log.warning("live streams not counted", extra={"model": served.name}, exc_info=True)
                continue
            for number, count in counts.items():
                metrics.LIVE_STREAMS.labels(served.name, str(number)).set(count)

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
        return self.served(chunk.model).batcher.submit(chunk)

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
        if len(self._models) == 1 or len({c.model for c in valid}) <= 1:
            served = self.served(valid[0].model) if valid else None
            futures = served.batcher.submit_many(valid) if served is not None else []
        else:
            futures = self._submit_to_models(valid)
        for index, future in zip(positions, futures, strict=True):
            answers[index] = future
        return answers

    def _submit_to_models(self, chunks: list[Chunk]) -> list[asyncio.Future[Prediction]]:
        """A message with chunks of several models: each model's batcher takes its part, all or none (every
        batcher is checked for room first, so no part is queued when another is refused)."""
        groups: dict[str, list[int]] = {}
        for index, chunk in enumerate(chunks):
            groups.setdefault(chunk.model, []).append(index)
        for name, indices in groups.items():
            self.served(name).batcher.check_room(len(indices))
        futures: list[asyncio.Future[Prediction]] = [None] * len(chunks)  # type: ignore[list-item]
        for name, indices in groups.items():
            for index, future in zip(indices, self.served(name).batcher.submit_many([chunks[i] for i in indices]),
                                     strict=True):
                futures[index] = future
        return futures

    def _over_rate(self, chunk: Chunk) -> ServiceError | None:
        """RESOURCE_EXHAUSTED when the chunk's tenant is over its chunks/s (a token is taken otherwise)."""
        if self._chunk_rate is None or not chunk.tenant or self._chunk_rate.allow(chunk.tenant):
            return None
        metrics.TENANT_CHUNKS.labels(chunk.tenant, "RESOURCE_EXHAUSTED").inc()
        return tenant_rate_exceeded(chunk.tenant, self._chunk_rate.limit(chunk.tenant))

    def abandon(self, answers: Sequence[asyncio.Future[Prediction]]) -> None:
        """The caller is gone (a broken stream): chunks not yet started are dropped, never run later."""
        for served in self._models.values():
            served.batcher.abandon(answers)

    async def reset_stream(self, stream_id: str, time_remaining: float | None = None, tenant: str = "",
                           model: str = "") -> bool:
        """Forget the stream's slot (Keras reset_states for this stream alone); True if the stream existed:
        an ended stream, whose record is kept only for retries of its last chunk, did not (GetStream agrees)."""
        served = self.served(model)
        deadline = self.deadline(time_remaining)
        existed = await served.store.delete(stream_id, deadline, tenant)
        if served.live_versions is not None:
            served.live_versions.ended(stream_id, tenant, now_unix_ms())
        if self._live is not None and tenant:
            await self._live.forget(tenant, served.processor.live_member(stream_id), deadline)
        return existed

    async def stream_status(self, stream_id: str, time_remaining: float | None = None, tenant: str = "",
                            model: str = "") -> StreamStatus:
        served = self.served(model)
        slot, ttl_ms = await served.store.inspect(stream_id, self.deadline(time_remaining), tenant)
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
            model=served.name,
            model_version=served.versions.number_of(slot.fingerprint),
        )

    async def stream_state(self, stream_id: str, model: str = "", model_version: int = 0,
                           time_remaining: float | None = None, tenant: str = "") -> StreamState:
        """The stream's recurrent state as named tensors, and its offset (GetStreamState, invariant 15):
        NOT_FOUND for a stream without state; a slot this model cannot continue gets a chunk's error."""
        served = self.served(model)
        slot = await live_slot(served.store, stream_id, self.deadline(time_remaining), tenant)
        version = served.versions.by_fingerprint(slot.fingerprint)
        if version is None:  # its tensors' names and shapes are those of a version not loaded here
            if retired := served.versions.number_of(slot.fingerprint):
                newest = served.versions.newest()
                raise version_retired(stream_id, served.name, retired, newest.number if newest else 0)
            raise saved_by_other_model(stream_id, slot.fingerprint.hex(), served.description.fingerprint)
        if model_version and model_version != version.number:
            raise model_version_unavailable(served.name, model_version, [version.number])
        layout = StateLayout(version.description.recurrent_layers)
        if slot.state.size != layout.state_size:
            raise slot_unreadable(stream_id, f"the saved state has {slot.state.size} values, the model needs "
                                  f"{layout.state_size}")
        return StreamState(stream_id, slot.offset, layout.split(slot.state), served.name, version.number)

    async def set_stream_state(self, state: StreamState, time_remaining: float | None = None, tenant: str = ""
                               ) -> tuple[int, int]:
        """Replace the stream's state and offset in one compare-and-set (SetStreamState, invariant 15): its next
        chunk continues from them. Everything is checked before anything is read or written (INVALID_ARGUMENT
        naming the field, NOT_FOUND for a model or version not hosted). Returns the offset and model version."""
        served = self.served(state.model)
        # A state starts a sequence: on a version that takes new ones (the newest, or a READY one named).
        version = served.versions.get(state.model_version) if state.model_version else served.versions.newest()
        if version is None or version.state != READY:
            raise model_version_unavailable(served.name, state.model_version, served.versions.ready_numbers())
        vector = StateLayout(version.description.recurrent_layers).join(state.tensors)
        if state.offset > MAX_SET_OFFSET:
            raise invalid_argument("offset", f"is {state.offset}; at most {MAX_SET_OFFSET}")
        await replace_slot(served.store, state.stream_id, vector, state.offset, version.fingerprint,
                           ttl_ms=self._policy.state_ttl_ms, deadline=self.deadline(time_remaining), tenant=tenant,
                           live=self._live, live_member=served.processor.live_member(state.stream_id))
        if served.live_versions is not None:
            served.live_versions.ran(state.stream_id, tenant, version.number, now_unix_ms())
        return state.offset, version.number
