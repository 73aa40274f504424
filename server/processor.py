"""One batch through the data path: load slots, apply the stream rules, run the model, save slots.

For a batch of chunks of distinct streams this costs one Redis round trip to load every slot, one
compiled model call for every chunk that runs, and one compare-and-set round trip to save. The
rules it applies per stream (docs/invariants.md, invariants 3, 4 and 7):

- `reset` starts from zero state at offset 0; otherwise the stream continues from its slot.
- A retry of the last applied chunk (same data, and the same start offset or request id) is answered
  with the stored response, `replayed=True`, and the state is not advanced again.
- A chunk naming a start offset other than the stream's offset is refused (FAILED_PRECONDITION).
- A slot written by a different model is never fed to this one: refused, or reset when configured.
- `end` runs the chunk, then drops the state; a short-lived record keeps its answer for retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np

from server.batching.batcher import CONFLICT, BatchResult
from server.errors import ServiceError, offset_mismatch, tenant_streams_exceeded
from server.model.runner import ModelRunner
from server.state.live import Change, LiveChange, LiveStreams
from server.state.record import (
    CorruptRecord,
    SlotRecord,
    chunk_digest,
    fingerprint_bytes,
    new_version,
    request_id_digest,
)
from server.state.store import Loaded, SlotWrite, StateStore, now_unix_ms
from server.types import Chunk, Prediction


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    state_ttl_ms: int = 86_400_000
    # How long an ended stream's last answer is kept for retries of its final chunk.
    ended_ttl_ms: int = 300_000
    # True: a slot written by another model is reset instead of refused.
    reset_on_model_change: bool = False


@dataclass(slots=True)
class _Planned:
    """A chunk that will run: where it starts from and what it overwrites."""

    index: int
    chunk: Chunk
    base_state: np.ndarray
    base_offset: int
    expected_version: bytes
    digest: bytes  # of the chunk's data: saved so a retry of it can be recognised


class BatchProcessor:
    def __init__(
        self, runner: ModelRunner, store: StateStore, policy: StreamPolicy, live: LiveStreams | None = None
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
        stateful = [i for i, chunk in enumerate(chunks) if chunk.stream_id is not None]
        loaded = await self.store.load(
            [chunks[i].stream_id for i in stateful], [chunks[i].tenant for i in stateful]  # type: ignore[misc]
        )
        slots: dict[int, Loaded] = dict(zip(stateful, loaded, strict=True))

        planned: list[_Planned] = []
        for index, chunk in enumerate(chunks):
            digest = chunk_digest(chunk) if chunk.stream_id is not None else b""
            outcome = self._plan(index, chunk, digest, slots.get(index))
            if isinstance(outcome, _Planned):
                planned.append(outcome)
            else:
                results[index] = outcome
        if self.live is not None and planned:
            planned = await self._admit(planned, slots, results)
        if not planned:
            return results  # type: ignore[return-value]

        states = np.stack([p.base_state for p in planned])
        loop = asyncio.get_running_loop()
        outputs, new_states = await loop.run_in_executor(
            self._model_thread, self.runner.run, [p.chunk.values for p in planned], states
        )

        writes: list[tuple[_Planned, SlotWrite]] = []
        now = now_unix_ms()
        for plan, output, state in zip(planned, outputs, new_states, strict=True):
            chunk = plan.chunk
            offset = plan.base_offset + chunk.timesteps
            results[plan.index] = Prediction(chunk.stream_id, output, offset, False, chunk.request_id)
            if chunk.stream_id is None:
                continue  # one-shot inference: nothing to save
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
            )
            ttl = self.policy.ended_ttl_ms if chunk.end else self.policy.state_ttl_ms
            writes.append((plan, SlotWrite(chunk.stream_id, plan.expected_version, record, ttl, chunk.tenant)))

        applied = await self.store.save([write for _, write in writes])
        for (plan, _), ok in zip(writes, applied, strict=True):
            if not ok:
                results[plan.index] = CONFLICT
        return results  # type: ignore[return-value]

    async def _admit(
        self, planned: list[_Planned], slots: dict[int, Loaded], results: list[BatchResult | None]
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
        allowed = await self.live.apply(changes, now_unix_ms())
        refused = {plan.index for plan, ok in zip(counted, allowed, strict=True) if not ok}
        for plan in counted:
            if plan.index in refused:
                results[plan.index] = tenant_streams_exceeded(plan.chunk.tenant, self.live.limit_of(plan.chunk.tenant))
        return [plan for plan in planned if plan.index not in refused]

    def _plan(self, index: int, chunk: Chunk, digest: bytes, slot: Loaded) -> _Planned | BatchResult:
        if chunk.stream_id is None:
            return _Planned(index, chunk, self._zero_state, 0, b"", digest)
        if isinstance(slot, CorruptRecord):
            if not chunk.reset:
                return ServiceError(
                    grpc.StatusCode.DATA_LOSS,
                    f"the saved state of stream {chunk.stream_id!r} is unreadable ({slot}); "
                    "send reset or call ResetStream to start it again",
                )
            return self._from_zero(index, chunk, digest, slot.version)
        if slot is not None and self._is_retry(chunk, digest, slot):
            return Prediction(chunk.stream_id, slot.last_outputs, slot.offset, True, chunk.request_id)
        if chunk.must_exist and not chunk.reset and (slot is None or slot.ended):
            return ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stream {chunk.stream_id!r} has no state (never started, ended, reset or expired); "
                "its first chunk must start the sequence",
                current_offset=0,
            )
        if slot is None:
            return self._from_zero(index, chunk, digest, b"")
        if chunk.reset or slot.ended:
            return self._from_zero(index, chunk, digest, slot.version)
        if slot.fingerprint != self._fingerprint:
            if self.policy.reset_on_model_change:
                return self._from_zero(index, chunk, digest, slot.version)
            return ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stream {chunk.stream_id!r} was saved by another model (fingerprint {slot.fingerprint.hex()}, "
                f"this server runs {self._fingerprint.hex()}); its state cannot be continued by this model. "
                "Send reset or call ResetStream to start the stream again, or run the server with "
                "--reset-on-model-change",
            )
        if chunk.start_offset is not None and chunk.start_offset != slot.offset:
            return offset_mismatch(chunk.stream_id, chunk.start_offset, slot.offset)
        if slot.state.size != self.runner.state_size:
            return ServiceError(grpc.StatusCode.DATA_LOSS, f"stream {chunk.stream_id!r}: saved state has wrong size")
        return _Planned(index, chunk, slot.state, slot.offset, slot.version, digest)

    def _from_zero(self, index: int, chunk: Chunk, digest: bytes, version: bytes) -> _Planned | ServiceError:
        if chunk.start_offset not in (None, 0):
            return offset_mismatch(chunk.stream_id or "", chunk.start_offset, 0)
        return _Planned(index, chunk, self._zero_state, 0, version, digest)

    @staticmethod
    def _is_retry(chunk: Chunk, digest: bytes, slot: SlotRecord) -> bool:
        if slot.last_digest != digest:
            return False
        if chunk.start_offset is not None:
            return chunk.start_offset == slot.last_start
        return bool(chunk.request_id) and request_id_digest(chunk.request_id) == slot.last_request_id
