"""One batch through the data path: load slots, apply the stream rules, run the model, save slots.

For a batch of chunks of distinct streams this costs one Redis round trip to load every slot (none
for the slots this process saved last, kept in memory: server/state/cache.py), one model call for
every chunk that runs, and one compare-and-set round trip to save. A slot from memory is only ever the
base of that compare-and-set; an answer without a save is decided on a slot read from Redis. What each
chunk does given its slot is the stream rules' decision (server/dataplane/rules.py); this module does
the I/O around them. Every answer matches the state (invariant 9, docs/invariants.md): a chunk is
answered OK only once Redis confirmed its save (with --redis-wait-replicas, once WAIT confirmed it on
replicas; a replay or a refusal, once the master holding its slot shows that replicas confirm it); the
store finds out what happened to a save whose answer was lost, until the batch's deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from server import metrics
from server.config import ServerConfig
from server.dataplane.rules import Planned, StreamRules, chunk_digest, live_change
from server.dataplane.versions import ModelControl, ModelVersions, ServingVersion
from server.errors import deadline_passed, tenant_streams_exceeded
from server.state.formats import RecordFormat
from server.state.live import LiveChange, LiveStreams
from server.state.live_versions import LiveStreamsByVersion
from server.state.record import SlotRecord
from server.state.store import APPLIED, REFUSED, Loaded, SlotWrite, StateStore, now_unix_ms
from server.types import CONFLICT, BatchResult, Chunk, ModelCall, Prediction


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    state_ttl_ms: int
    # How long an ended stream's last answer is kept for retries of its final chunk.
    ended_ttl_ms: int
    # What a chunk of a slot of a version no longer served (or of another model) gets: "refuse", "reset", or
    # "replay" (its state rebuilt on the newest version from the input history; reset without history).
    on_retired: str
    # How long a batch may wait for Redis when none of its chunks carries a deadline.
    request_deadline_s: float
    # Answers kept per stream for retries, and their bytes (--replay-window, --replay-window-bytes).
    replay_window: int = 1
    replay_window_bytes: int = 0
    # Input timesteps kept per stream (--history-timesteps; 0: none).
    history_timesteps: int = 0

    @classmethod
    def from_config(cls, config: ServerConfig) -> StreamPolicy:
        on_retired = "reset" if config.reset_on_model_change else config.on_retired_version
        return cls(config.state_ttl_ms, config.ended_ttl_ms, on_retired, config.request_deadline_s,
                   config.replay_window, config.replay_window_bytes, config.history_timesteps)


@dataclass(slots=True)
class ModelSchedule:
    """When the model thread is expected to be free, from its recent calls: the batcher starts its next batch so
    that the batch's loads and rules end as the model's call does (server/dataplane/batcher.py)."""

    batches: int = 0  # batches in their model call, or waiting for the model thread
    free_at: float = 0.0  # when the last of them is expected to be done (time.monotonic)
    call_s: float = 0.0  # a model call's recent length
    prepare_s: float = 0.0  # a batch's recent time from its start to its model call
    last_done_ns: int = 0  # when the model thread finished its last call (time.monotonic_ns)

    # Weight of the newest call in the averages: the recent calls' length, yet one slow call moves little.
    NEWEST = 0.2

    def entered(self, batch_started: float) -> None:
        now = time.monotonic()
        self.prepare_s += self.NEWEST * (now - batch_started - self.prepare_s)
        self.batches += 1
        self.free_at = max(now, self.free_at) + self.call_s

    def ran(self, submitted_ns: int, done_ns: int) -> None:
        # One thread runs the calls in turn: a call submitted while another ran started when that one was done.
        seconds = (done_ns - max(submitted_ns, self.last_done_ns)) / 1e9
        self.last_done_ns = done_ns
        self.call_s += self.NEWEST * (seconds - self.call_s)

    def left(self) -> bool:
        """A batch's model call is over; True when the model is free."""
        self.batches -= 1
        if self.batches:
            return False
        self.free_at = time.monotonic()
        return True

    def free_in(self) -> float:
        """Seconds a batch started now would wait for the model once prepared (0 or less: none)."""
        if not self.batches:
            return 0.0
        return self.free_at - self.prepare_s - time.monotonic()


@dataclass(slots=True)
class _Batch:
    """One batch on its way through `BatchProcessor.__call__`: what is known so far, per chunk index."""

    chunks: Sequence[Chunk]
    # Redis is waited for as long as any caller of the batch waits (a caller that gave up meanwhile
    # loses nothing: its chunk is applied once or not at all, and its retry is recognised).
    deadline: float
    results: list[BatchResult | None]
    slots: dict[int, Loaded] = field(default_factory=dict)
    from_memory: set[int] = field(default_factory=set)  # slots taken from this process's memory
    planned: list[Planned] = field(default_factory=list)  # the chunks that run
    recheck: list[tuple[int, bytes]] = field(default_factory=list)  # answers to decide on Redis' slot
    # Chunks of streams answered from a slot read from Redis without a save (replays, refusals).
    decided: set[int] = field(default_factory=set)

    def tenants(self, indices: Sequence[int]) -> list[str]:
        return [self.chunks[i].tenant for i in indices]

    def stream_ids(self, indices: Sequence[int]) -> list[str]:
        return [self.chunks[i].stream_id for i in indices]  # type: ignore[misc]


class BatchProcessor:
    def __init__(
        self, versions: ModelVersions, store: StateStore, policy: StreamPolicy, live: LiveStreams | None = None,
        record_format: RecordFormat | None = None, live_namespace: str = "",
        control: Callable[[], ModelControl | None] = lambda: None, live_versions: LiveStreamsByVersion | None = None,
    ) -> None:
        self.versions = versions
        # Finds the versions of fingerprints this process never loaded (a model repository's; None without one).
        self._control = control
        self.store = store  # this model's stream namespace (StateStore.namespaced)
        self.policy = policy
        self.live = live  # per-tenant live-stream limits; None without API keys or without such limits
        # Tenants' live streams count every model's: a stream of a model with its own namespace is counted as
        # `@<model>/<id>` (one tenant's live set holds every model's streams).
        self._live_prefix = f"@{live_namespace}/" if live_namespace else ""
        self.live_versions = live_versions  # the metric of live streams per version; None: not counted
        self.rules = StreamRules(
            versions, policy.on_retired, policy.replay_window, policy.replay_window_bytes,
            (lambda: record_format.keeps_earlier_answers) if record_format else lambda: True,
            history_timesteps=policy.history_timesteps,
            history_allowed=(lambda: record_format.keeps_history) if record_format else lambda: True,
        )
        # One thread owns the model: calls never overlap, and the event loop stays free meanwhile.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        # When the model is free, and who to tell when it is: the batcher lets its next batch grow until then
        # (server/dataplane/batcher.py).
        self.model_schedule = ModelSchedule()
        self.on_model_free: Callable[[], None] = lambda: None

    def live_member(self, stream_id: str) -> str:
        """The stream as its tenant's live set counts it (server/state/live.py)."""
        return self._live_prefix + stream_id

    def close(self) -> None:
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, chunks: Sequence[Chunk]) -> list[BatchResult]:
        started = time.monotonic()
        deadlines = [c.deadline for c in chunks if c.deadline is not None]
        batch = _Batch(chunks, max(deadlines) if deadlines else started + self.policy.request_deadline_s,
                       [None] * len(chunks))
        stateful = [i for i, chunk in enumerate(chunks) if chunk.stream_id is not None]
        await self._load(batch, stateful)
        await self._locate_versions(batch)
        self._plan_all(batch)
        rechecked = len(batch.recheck)
        if batch.recheck:
            await self._recheck(batch)
        if self.store.saved_slots is not None:
            metrics.count_slot_loads(len(stateful), len(batch.from_memory), rechecked)
        await self._confirm_answers(batch)
        if self.live is not None and batch.planned:
            await self._admit(batch)
        if batch.planned:
            self.model_schedule.entered(started)
            try:
                outputs, states = await self._run_model(batch.planned)
            finally:
                if self.model_schedule.left():
                    self.on_model_free()
            await self._save(batch, outputs, states)
        return batch.results  # type: ignore[return-value]

    async def _load(self, batch: _Batch, stateful: list[int]) -> None:
        """Every stream's slot: from this process's memory where allowed, else from Redis."""
        loaded, recent = await self.store.load_recent(
            batch.stream_ids(stateful), batch.deadline, batch.tenants(stateful),
            [self._may_start_from_memory(batch.chunks[i]) for i in stateful],
        )
        batch.slots = dict(zip(stateful, loaded, strict=True))
        batch.from_memory = {i for i, hit in zip(stateful, recent, strict=True) if hit}

    async def _locate_versions(self, batch: _Batch) -> None:
        """Slots written by versions this process never loaded (another replica's): which versions they are, before
        the rules decide (one registry read, on this rare path only)."""
        control = self._control()
        if control is None:
            return
        unknown = {slot.fingerprint for slot in batch.slots.values() if isinstance(slot, SlotRecord)
                   and not slot.ended and self.versions.needs_locating(slot.fingerprint)}
        if unknown:
            await control.locate(self.versions, unknown, batch.deadline)

    def _plan_all(self, batch: _Batch) -> None:
        now = time.monotonic()
        for index, chunk in enumerate(batch.chunks):
            if chunk.deadline is not None and chunk.deadline <= now:
                batch.results[index] = deadline_passed(chunk.stream_id)  # its caller is gone: do not run it
                continue
            self._plan_one(batch, index, chunk_digest(chunk) if chunk.stream_id is not None else b"")

    def _plan_one(self, batch: _Batch, index: int, digest: bytes) -> None:
        outcome = self.rules.plan(index, batch.chunks[index], digest, batch.slots.get(index))
        if isinstance(outcome, Planned):
            batch.planned.append(outcome)
        elif index in batch.from_memory:
            # A slot from memory may be stale: it may only be the base of a save, whose compare-and-set
            # checks it. Any other answer (a replay, a refusal) is decided again on Redis' slot.
            batch.recheck.append((index, digest))
        else:
            batch.results[index] = outcome
            if batch.chunks[index].stream_id is not None:
                batch.decided.add(index)

    async def _recheck(self, batch: _Batch) -> None:
        indices = [i for i, _ in batch.recheck]
        fresh = await self.store.load(batch.stream_ids(indices), batch.deadline, batch.tenants(indices))
        recheck, batch.recheck = batch.recheck, []
        for (index, digest), slot in zip(recheck, fresh, strict=True):
            batch.slots[index] = slot
            batch.from_memory.discard(index)
            self._plan_one(batch, index, digest)

    async def _confirm_answers(self, batch: _Batch) -> None:
        """With --redis-wait-replicas, an answer that ends in no save (a replay, a refusal) is given only once
        the master still holds the slot it was decided on and replicas confirm it, on one connection: an
        earlier attempt may have been answered UNAVAILABLE because WAIT came back short, and a read may have
        reached an old master cut off by a failover, or one since demoted (invariants 8 and 9). A slot that
        changed meanwhile is decided again, as a refused save is."""
        if not self.store.waits_for_replicas:
            return
        indices = [i for i in batch.decided if isinstance(batch.slots.get(i), SlotRecord | None)]
        if not indices:
            return
        versions = [slot.version if (slot := batch.slots.get(i)) is not None else b"" for i in indices]
        answers = await self.store.confirm(batch.stream_ids(indices), versions, batch.deadline, batch.tenants(indices))
        for index, answer in zip(indices, answers, strict=True):
            if answer is REFUSED:
                batch.results[index] = CONFLICT
            elif answer is not None:
                batch.results[index] = answer

    async def _admit(self, batch: _Batch) -> None:
        """Refuse (RESOURCE_EXHAUSTED) a chunk that would start a stream past its tenant's live-stream limit."""
        assert self.live is not None
        counted = [p for p in batch.planned if p.chunk.stream_id is not None and p.chunk.tenant]
        changes = [LiveChange(p.chunk.tenant, self.live_member(p.chunk.stream_id or ""),
                              live_change(p, batch.slots.get(p.index)))
                   for p in counted]
        allowed = await self.live.apply(changes, now_unix_ms(), batch.deadline)
        refused = {p.index for p, ok in zip(counted, allowed, strict=True) if not ok}
        for p in counted:
            if p.index in refused:
                batch.results[p.index] = tenant_streams_exceeded(p.chunk.tenant, self.live.limit_of(p.chunk.tenant))
        batch.planned = [p for p in batch.planned if p.index not in refused]

    def _may_start_from_memory(self, chunk: Chunk) -> bool:
        # A limited tenant's chunk is counted against its live-stream limit from the slot it starts from
        # (`_admit`), before any save could notice a stale one: its slot always comes from Redis.
        return self.live is None or not chunk.tenant or self.live.limit_of(chunk.tenant) <= 0

    async def _run_model(self, planned: list[Planned]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """One model call per version for the chunks that run (one, unless sequences of several versions are
        live), on the model's own thread; each chunk's outputs and new state, in `planned`'s order."""
        versions = {id(p.version): p.version for p in planned}
        if len(versions) == 1:
            (version,) = versions.values()
            outputs, states = await self._run_version(version, planned)  # type: ignore[arg-type]
            return outputs, list(states)
        all_outputs: list[np.ndarray] = [np.empty(0, np.float32)] * len(planned)
        all_states: list[np.ndarray] = [np.empty(0, np.float32)] * len(planned)
        for key, version in versions.items():
            positions = [i for i, p in enumerate(planned) if id(p.version) == key]
            outputs, states = await self._run_version(version, [planned[i] for i in positions])  # type: ignore[arg-type]
            for i, output, state in zip(positions, outputs, states, strict=True):
                all_outputs[i], all_states[i] = output, state
        return all_outputs, all_states

    async def _run_version(self, version: ServingVersion, planned: list[Planned]
                           ) -> tuple[list[np.ndarray], np.ndarray]:
        loop = asyncio.get_running_loop()
        rebuilt = [p for p in planned if p.replay_inputs is not None]
        if rebuilt:
            # --on-retired-version replay: the states of streams moved off a retired version, rebuilt on this one
            # from their kept inputs, in one call before the chunks run.
            _, states = await loop.run_in_executor(
                self._model_thread, version.runner.run, [p.replay_inputs for p in rebuilt],
                version.runner.zero_states(len(rebuilt)))
            for p, state in zip(rebuilt, states, strict=True):
                p.base_state = state
        states = np.stack([p.base_state for p in planned])
        started = time.monotonic_ns()
        outputs, new_states = await loop.run_in_executor(
            self._model_thread, version.runner.run, [p.chunk.values for p in planned], states
        )
        finished = time.monotonic_ns()
        self.model_schedule.ran(started, finished)
        version.last_used = time.monotonic()
        metrics.VERSION_CHUNKS.labels(self.versions.name, str(version.number)).inc(len(planned))  # once a batch
        timed = [p.chunk.times for p in planned if p.chunk.times is not None]  # Triton's statistics, tracing
        if timed:
            # Traced chunks share one record of the call (its span links them); none is made untraced.
            call = ModelCall(timed) if any(times.trace is not None for times in timed) else None
            for times in timed:
                times.model_ran(started, finished, len(planned), call)
        return outputs, new_states

    async def _save(self, batch: _Batch, outputs: list[np.ndarray], states: list[np.ndarray]) -> None:
        """Answer every chunk that ran, and save its stream's new record; a refused save takes its answer back."""
        writes: list[tuple[Planned, SlotWrite]] = []
        now = now_unix_ms()
        for p, output, state in zip(batch.planned, outputs, states, strict=True):
            chunk = p.chunk
            batch.results[p.index] = Prediction(chunk.stream_id, output, p.base_offset + chunk.timesteps, False,
                                                chunk.request_id, p.version.number,  # type: ignore[union-attr]
                                                p.migration, p.migrated_from, p.history_start)
            if chunk.stream_id is None:
                continue  # one-shot inference: nothing to save
            ttl = self.policy.ended_ttl_ms if chunk.end else self.policy.state_ttl_ms
            record = self.rules.record_after(p, output, state, now)
            writes.append((p, SlotWrite(chunk.stream_id, p.expected_version, record, ttl, chunk.tenant)))
        saved = await self.store.save([write for _, write in writes], batch.deadline)
        for (p, _), result in zip(writes, saved, strict=True):
            if result is APPLIED:
                if self.live_versions is not None:
                    if p.chunk.end:
                        self.live_versions.ended(p.chunk.stream_id, p.chunk.tenant, now)  # type: ignore[arg-type]
                    else:
                        self.live_versions.ran(p.chunk.stream_id, p.chunk.tenant,  # type: ignore[arg-type]
                                               p.version.number, now)  # type: ignore[union-attr]
                continue  # the prediction stands
            if result is REFUSED and p.index in batch.from_memory:
                metrics.SLOT_MEMORY_REFUSED.inc()
            # REFUSED: another writer was first; the chunk runs again on the fresh state, where the rules
            # tell a retry or a late duplicate from a new chunk. A ServiceError: that stream alone.
            batch.results[p.index] = CONFLICT if result is REFUSED else result
