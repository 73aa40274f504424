"""One batch through the data path: load slots, apply the stream rules, run the model, save slots.

For a batch of chunks of distinct streams this costs one Redis round trip to load every slot (none
for the slots this process saved last, kept in memory: server/state/cache.py), one model call for
every chunk that runs, and one compare-and-set round trip to save. A slot from memory is only ever the
base of that compare-and-set; an answer without a save is decided on a slot read from Redis. The
rules it applies per stream (docs/invariants.md, invariants 3, 4, 7, 9 and 10):

- `reset` starts from zero state at offset 0; otherwise the stream continues from its slot.
- A retry of the last applied chunk (same data, and the same start offset or request id; for a reset
  chunk, the same request id or none) is answered with the stored response, `replayed=True`, and the
  state is not advanced again.
- A late duplicate of an earlier chunk of the current sequence changes nothing (invariant 10): a reset
  chunk equal to the one that started the sequence (same data and request id), or a chunk without a
  start offset whose request id and data match one of the sequence's last RECENT_REQUESTS chunks with
  a request id, is refused (FAILED_PRECONDITION); a chunk naming an offset before the stream's is
  refused by the offset rule.
- A chunk naming a start offset other than the stream's offset is refused (FAILED_PRECONDITION).
- A slot written by a different model is never fed to this one: refused, or reset when configured.
- `end` runs the chunk, then drops the state; a short-lived record keeps its answer for retries.
- Every answer matches the state (invariant 9): a chunk is answered OK only once Redis confirmed its
  save (with --redis-wait-replicas, once WAIT confirmed it on replicas, a replay too); the store finds
  out what happened to a save whose answer was lost, until the batch's deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from server import metrics
from server.config import ServerConfig
from server.errors import (
    ServiceError,
    deadline_passed,
    late_duplicate,
    offset_mismatch,
    saved_by_other_model,
    slot_unreadable,
    slot_wrong_type,
    stream_not_started,
    tenant_streams_exceeded,
)
from server.state.live import Change, LiveChange, LiveStreams
from server.state.record import (
    RECENT_REQUESTS,
    REQUEST_DIGEST_SIZE,
    CorruptRecord,
    SlotRecord,
    fingerprint_bytes,
    new_version,
)
from server.state.store import APPLIED, REFUSED, Loaded, SlotWrite, StateStore, WrongType, now_unix_ms
from server.types import CONFLICT, BatchResult, Chunk, Prediction, Runner

RECENT_BYTES = RECENT_REQUESTS * REQUEST_DIGEST_SIZE


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    state_ttl_ms: int
    # How long an ended stream's last answer is kept for retries of its final chunk.
    ended_ttl_ms: int
    # True: a slot written by another model is reset instead of refused.
    reset_on_model_change: bool
    # How long a batch may wait for Redis when none of its chunks carries a deadline.
    request_deadline_s: float

    @classmethod
    def from_config(cls, config: ServerConfig) -> StreamPolicy:
        return cls(config.state_ttl_ms, config.ended_ttl_ms, config.reset_on_model_change, config.request_deadline_s)


# What a saved record keeps to recognise a retry or a late duplicate of a chunk (server/state/record.py
# stores them; only this module computes and compares them).

def chunk_digest(chunk: Chunk) -> bytes:
    """The chunk's data: its values and shape, and its reset and end flags (16 bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(bytes([chunk.reset, chunk.end]))
    digest.update(struct.pack("<II", *chunk.values.shape))
    digest.update(chunk.values.tobytes())
    return digest.digest()


def request_id_digest(request_id: str) -> bytes:
    if not request_id:
        return bytes(REQUEST_DIGEST_SIZE)
    return hashlib.blake2b(request_id.encode(), digest_size=REQUEST_DIGEST_SIZE).digest()


def request_digest(request_id: str, data_digest: bytes) -> bytes:
    """One chunk's identity among the recent ones: its request_id and its data (a reused id with other
    data is another chunk, not a duplicate)."""
    return hashlib.blake2b(request_id.encode() + data_digest, digest_size=REQUEST_DIGEST_SIZE).digest()


@dataclass(slots=True)
class _Planned:
    """A chunk that will run: where it starts from and what it overwrites."""

    index: int
    chunk: Chunk
    base_state: np.ndarray
    base_offset: int
    expected_version: bytes
    digest: bytes  # of the chunk's data: saved so a retry of it can be recognised
    # What the new record keeps to recognise late duplicates (invariant 10): the chunk that started the
    # sequence, and the recent request digests before this chunk.
    first_digest: bytes = b""
    first_request_id: bytes = b""
    recent_requests: bytes = b""


class BatchProcessor:
    def __init__(
        self, runner: Runner, store: StateStore, policy: StreamPolicy, live: LiveStreams | None = None
    ) -> None:
        self.runner = runner
        self.store = store
        self.policy = policy
        self.live = live  # per-tenant live-stream limits; None without API keys or without such limits
        self._fingerprint = fingerprint_bytes(runner.description.fingerprint)
        self._zero_state = runner.zero_states(1)[0]
        # One thread owns the model: calls never overlap, and the event loop stays free meanwhile.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def close(self) -> None:
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, chunks: Sequence[Chunk]) -> list[BatchResult]:
        results: list[BatchResult | None] = [None] * len(chunks)
        # Redis is waited for as long as any caller of the batch waits (a caller that gave up meanwhile
        # loses nothing: its chunk is applied once or not at all, and its retry is recognised).
        deadlines = [c.deadline for c in chunks if c.deadline is not None]
        deadline = max(deadlines) if deadlines else time.monotonic() + self.policy.request_deadline_s
        stateful = [i for i, chunk in enumerate(chunks) if chunk.stream_id is not None]
        loaded, recent = await self.store.load_recent(
            [chunks[i].stream_id for i in stateful], deadline, [chunks[i].tenant for i in stateful],  # type: ignore[misc]
            [self._may_start_from_memory(chunks[i]) for i in stateful],
        )
        slots: dict[int, Loaded] = dict(zip(stateful, loaded, strict=True))
        from_memory = {i for i, hit in zip(stateful, recent, strict=True) if hit}

        planned: list[_Planned] = []
        recheck: list[tuple[int, bytes]] = []

        def plan(index: int, digest: bytes) -> None:
            outcome = self._plan(index, chunks[index], digest, slots.get(index))
            if isinstance(outcome, _Planned):
                planned.append(outcome)
            elif index in from_memory:
                # A slot from memory may be stale: it may only be the base of a save, whose compare-and-set
                # checks it. Any other answer (a replay, a refusal) is decided again on Redis' slot.
                recheck.append((index, digest))
            else:
                results[index] = outcome

        now = time.monotonic()
        for index, chunk in enumerate(chunks):
            if chunk.deadline is not None and chunk.deadline <= now:
                results[index] = deadline_passed(chunk.stream_id)  # its caller is gone: do not run it
                continue
            plan(index, chunk_digest(chunk) if chunk.stream_id is not None else b"")
        if recheck:
            fresh = await self.store.load([chunks[i].stream_id for i, _ in recheck], deadline,  # type: ignore[misc]
                                          [chunks[i].tenant for i, _ in recheck])
            for (index, digest), slot in zip(recheck, fresh, strict=True):
                slots[index] = slot
                from_memory.discard(index)
                plan(index, digest)
        if self.store.saved_slots is not None:
            metrics.count_slot_loads(len(stateful), len(from_memory), len(recheck))
        await self._confirm_replays(chunks, results, deadline)
        if self.live is not None and planned:
            planned = await self._admit(planned, slots, results, deadline)
        if not planned:
            return results  # type: ignore[return-value]

        states = np.stack([p.base_state for p in planned])
        loop = asyncio.get_running_loop()
        model_started = time.monotonic_ns()
        outputs, new_states = await loop.run_in_executor(
            self._model_thread, self.runner.run, [p.chunk.values for p in planned], states
        )
        model_finished = time.monotonic_ns()
        for plan in planned:
            if plan.chunk.times is not None:
                plan.chunk.times.model_ran(model_started, model_finished, len(planned))

        writes: list[tuple[_Planned, SlotWrite]] = []
        now = now_unix_ms()
        for plan, output, state in zip(planned, outputs, new_states, strict=True):
            chunk = plan.chunk
            offset = plan.base_offset + chunk.timesteps
            results[plan.index] = Prediction(chunk.stream_id, output, offset, False, chunk.request_id)
            if chunk.stream_id is None:
                continue  # one-shot inference: nothing to save
            recent = plan.recent_requests
            if chunk.request_id:
                recent = (recent + request_digest(chunk.request_id, plan.digest))[-RECENT_BYTES:]
            record = SlotRecord(
                version=new_version(),
                offset=offset,
                updated_unix_ms=now,
                fingerprint=self._fingerprint,
                last_start=plan.base_offset,
                last_digest=plan.digest,
                last_request_id=request_id_digest(chunk.request_id),
                state=state[:0] if chunk.end else state,
                last_outputs=output,
                ended=chunk.end,
                first_digest=plan.first_digest,
                first_request_id=plan.first_request_id,
                recent_requests=recent,
            )
            ttl = self.policy.ended_ttl_ms if chunk.end else self.policy.state_ttl_ms
            writes.append((plan, SlotWrite(chunk.stream_id, plan.expected_version, record, ttl, chunk.tenant)))

        saved = await self.store.save([write for _, write in writes], deadline)
        for (plan, _), result in zip(writes, saved, strict=True):
            if result is APPLIED:
                continue  # the prediction stands
            if result is REFUSED and plan.index in from_memory:
                metrics.SLOT_MEMORY_REFUSED.inc()
            # REFUSED: another writer was first; the chunk runs again on the fresh state, where the rules
            # above tell a retry or a late duplicate from a new chunk. A ServiceError: that stream alone.
            results[plan.index] = CONFLICT if result is REFUSED else result
        return results  # type: ignore[return-value]

    async def _confirm_replays(self, chunks: Sequence[Chunk], results: list[BatchResult | None],
                               deadline: float) -> None:
        """With --redis-wait-replicas, a replayed answer is acknowledged only once replicas hold it (an
        earlier attempt may have been answered UNAVAILABLE because WAIT came back short)."""
        if not self.store.waits_for_replicas:
            return
        replays = [i for i, r in enumerate(results) if isinstance(r, Prediction) and r.replayed]
        if not replays:
            return
        errors = await self.store.confirm(
            [results[i].stream_id for i in replays], deadline, [chunks[i].tenant for i in replays]  # type: ignore[union-attr]
        )
        for index, error in zip(replays, errors, strict=True):
            if error is not None:
                results[index] = error

    async def _admit(
        self, planned: list[_Planned], slots: dict[int, Loaded], results: list[BatchResult | None], deadline: float
    ) -> list[_Planned]:
        """Refuse (RESOURCE_EXHAUSTED) a chunk that would start a stream past its tenant's live-stream limit."""
        assert self.live is not None
        counted = [plan for plan in planned if plan.chunk.stream_id is not None and plan.chunk.tenant]
        changes = []
        for plan in counted:
            slot = slots.get(plan.index)
            live = slot is not None and not (isinstance(slot, SlotRecord) and slot.ended)
            # A stream that ends with this chunk holds no state afterwards, so it never needs a place.
            change = Change.END if plan.chunk.end else Change.CONTINUE if live else Change.NEW
            changes.append(LiveChange(plan.chunk.tenant, plan.chunk.stream_id, change))  # type: ignore[arg-type]
        allowed = await self.live.apply(changes, now_unix_ms(), deadline)
        refused = {plan.index for plan, ok in zip(counted, allowed, strict=True) if not ok}
        for plan in counted:
            if plan.index in refused:
                results[plan.index] = tenant_streams_exceeded(plan.chunk.tenant, self.live.limit_of(plan.chunk.tenant))
        return [plan for plan in planned if plan.index not in refused]

    def _may_start_from_memory(self, chunk: Chunk) -> bool:
        # A limited tenant's chunk is counted against its live-stream limit from the slot it starts from
        # (`_admit`), before any save could notice a stale one: its slot always comes from Redis.
        return self.live is None or not chunk.tenant or self.live.limit_of(chunk.tenant) <= 0

    def _plan(self, index: int, chunk: Chunk, digest: bytes, slot: Loaded) -> _Planned | BatchResult:
        if chunk.stream_id is None:
            return _Planned(index, chunk, self._zero_state, 0, b"", digest)
        stream_id = chunk.stream_id
        if isinstance(slot, WrongType):
            return slot_wrong_type(stream_id, slot.key, slot.redis_type)
        if isinstance(slot, CorruptRecord):
            if not chunk.reset:
                return slot_unreadable(stream_id, str(slot))
            return self._from_zero(index, chunk, digest, slot.version)
        if slot is not None and self._is_retry(chunk, digest, slot):
            return Prediction(stream_id, slot.last_outputs, slot.offset, True, chunk.request_id)
        if slot is not None and not slot.ended and (duplicate := self._late_duplicate(chunk, digest, slot)):
            return duplicate
        if chunk.must_exist and not chunk.reset and (slot is None or slot.ended):
            return stream_not_started(stream_id)
        if slot is None:
            return self._from_zero(index, chunk, digest, b"")
        if chunk.reset or slot.ended:
            return self._from_zero(index, chunk, digest, slot.version)
        if slot.fingerprint != self._fingerprint:
            if self.policy.reset_on_model_change:
                return self._from_zero(index, chunk, digest, slot.version)
            return saved_by_other_model(stream_id, slot.fingerprint.hex(), self._fingerprint.hex())
        if chunk.start_offset is not None and chunk.start_offset != slot.offset:
            return offset_mismatch(stream_id, chunk.start_offset, slot.offset)
        if slot.state.size != self.runner.state_size:
            return slot_unreadable(
                stream_id, f"the saved state has {slot.state.size} values, the model needs {self.runner.state_size}"
            )
        return _Planned(index, chunk, slot.state, slot.offset, slot.version, digest,
                        slot.first_digest, slot.first_request_id, slot.recent_requests)

    def _from_zero(self, index: int, chunk: Chunk, digest: bytes, version: bytes) -> _Planned | ServiceError:
        """The chunk starts a new sequence: it is the one whose late copies are recognised (invariant 10)."""
        if chunk.start_offset not in (None, 0):
            return offset_mismatch(chunk.stream_id or "", chunk.start_offset, 0)
        return _Planned(index, chunk, self._zero_state, 0, version, digest, digest,
                        request_id_digest(chunk.request_id), b"")

    @staticmethod
    def _is_retry(chunk: Chunk, digest: bytes, slot: SlotRecord) -> bool:
        if slot.last_digest != digest:
            return False
        if chunk.start_offset is not None:
            return chunk.start_offset == slot.last_start
        if chunk.reset:
            # The digest covers the reset flag, so the last chunk was this reset (at offset 0): the same
            # request id, or none on both, makes it a retry rather than a second restart.
            return request_id_digest(chunk.request_id) == slot.last_request_id
        return bool(chunk.request_id) and request_id_digest(chunk.request_id) == slot.last_request_id

    @staticmethod
    def _late_duplicate(chunk: Chunk, digest: bytes, slot: SlotRecord) -> ServiceError | None:
        """Invariant 10 for chunks the offset rule cannot tell: a reset, or a chunk without a start offset."""
        stream_id = chunk.stream_id or ""
        if chunk.reset:
            if digest == slot.first_digest and request_id_digest(chunk.request_id) == slot.first_request_id:
                return late_duplicate(stream_id, slot.offset, "the chunk that started the current sequence")
        elif (chunk.start_offset is None and chunk.request_id
              and slot.has_recent_request(request_digest(chunk.request_id, digest))):
            return late_duplicate(stream_id, slot.offset, f"a recent chunk with request_id {chunk.request_id!r}")
        return None
