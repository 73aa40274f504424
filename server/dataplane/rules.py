"""The stream rules: what one chunk does, given its stream's slot (docs/invariants.md, invariants 3, 4, 7, 9, 10).

Pure decisions, no I/O: server/dataplane/processor.py loads the slots, asks `StreamRules.plan` about each
chunk, runs the model for the chunks that run, and saves the records `StreamRules.record_after` builds.

- `reset` starts from zero state at offset 0; otherwise the stream continues from its slot.
- A retry of one of the sequence's last `replay_window` applied chunks (same data, and the same start
  offset or request id; for a reset chunk, the same request id or none) is answered with its stored
  response, `replayed=True`, and the state is not advanced again (invariant 11). The answers are those
  of the current sequence: a reset starts the window again, so a chunk of an earlier sequence that
  happens to repeat data at an offset of this one is never taken for a retry.
- A late duplicate of an earlier chunk of the current sequence changes nothing (invariant 10): a reset
  chunk equal to the one that started the sequence (same data and request id), or a chunk without a
  start offset whose request id and data match one of the sequence's last RECENT_REQUESTS chunks with
  a request id, is refused (FAILED_PRECONDITION); a chunk naming an offset before the stream's is
  refused by the offset rule.
- A chunk naming a start offset other than the stream's offset is refused (FAILED_PRECONDITION).
- A sequence runs on the model version that started it (invariant 14): the version whose fingerprint its
  slot carries, while that version serves; a new sequence starts on the newest version or the one its first
  chunk names. A slot of a version no longer served, or of another model, is never fed to this one (invariant
  7): refused, or the chunk starts a new sequence on the newest version (`--on-retired-version reset`).
- `end` runs the chunk, then drops the state; a short-lived record keeps its answer for retries.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from server import metrics
from server.dataplane.versions import READY, ModelVersions, ServingVersion
from server.errors import (
    ServiceError,
    late_duplicate,
    model_version_unavailable,
    offset_mismatch,
    pinned_to_version,
    redis_unavailable,
    saved_by_other_model,
    slot_from_newer_release,
    slot_unreadable,
    slot_wrong_type,
    stream_not_started,
    version_loading,
    version_retired,
)
from server.state.live import Change
from server.state.record import (
    NEWEST_FORMAT,
    NO_EARLIER,
    RECENT_REQUESTS,
    REQUEST_DIGEST_SIZE,
    CorruptRecord,
    KeptAnswers,
    NewerRecord,
    SlotRecord,
    new_version,
)
from server.state.store import Loaded, WrongType
from server.types import BatchResult, Chunk, Prediction

RECENT_BYTES = RECENT_REQUESTS * REQUEST_DIGEST_SIZE
NO_REQUEST_ID = bytes(REQUEST_DIGEST_SIZE)  # the digest of an empty request_id
_NO_HISTORY = (b"", 0, 0)


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
        return NO_REQUEST_ID
    return hashlib.blake2b(request_id.encode(), digest_size=REQUEST_DIGEST_SIZE).digest()


def request_digest(request_id: str, data_digest: bytes) -> bytes:
    """One chunk's identity among the recent ones: its request_id and its data (a reused id with other
    data is another chunk, not a duplicate)."""
    return hashlib.blake2b(request_id.encode() + data_digest, digest_size=REQUEST_DIGEST_SIZE).digest()


@dataclass(slots=True)
class Planned:
    """A chunk that will run: where it starts from and what it overwrites."""

    index: int  # its place in the batch
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
    # The answers of the sequence's chunks before this one that the new record may keep, oldest first.
    earlier: KeptAnswers = NO_EARLIER
    # The model version it runs on; how its stream moved off a retired version ("reset", "replay"; "" not),
    # and which (0: another model's slot).
    version: ServingVersion | None = None
    migrated_from: int = 0
    migration: str = ""
    # The stream's kept inputs before this chunk (--history-timesteps), the first at offset history_start.
    history: bytes = b""
    history_start: int = 0
    # "replay": the inputs to rebuild the base state from on `version`, before the chunk runs.
    replay_inputs: np.ndarray | None = None


def live_change(planned: Planned, slot: Loaded) -> Change:
    """How a chunk that runs changes its tenant's count of live streams (server/state/live.py)."""
    if planned.chunk.end:
        return Change.END  # a stream that ends with this chunk holds no state afterwards: it needs no place
    live = slot is not None and not (isinstance(slot, SlotRecord) and slot.ended)
    return Change.CONTINUE if live else Change.NEW


class StreamRules:
    """The rules for one model: `versions` are the ones its slots may carry (server/dataplane/versions.py);
    `on_retired` (--on-retired-version): what a chunk of a sequence pinned to a version no longer served gets:
    refused ("refuse"), a new sequence on the newest version ("reset"), or its sequence continued there from a
    state rebuilt from its kept inputs ("replay", with `history_timesteps`; reset when it has none)."""

    def __init__(self, versions: ModelVersions, on_retired: str = "refuse",
                 replay_window: int = 1, replay_window_bytes: int = 0,
                 earlier_allowed: Callable[[], bool] = lambda: True, *, history_timesteps: int = 0,
                 history_allowed: Callable[[], bool] = lambda: True) -> None:
        self.versions = versions
        self.on_retired = on_retired
        # --history-timesteps: inputs kept per stream, while the deployment's record format allows (format 4).
        self.history_timesteps = history_timesteps
        self._history_allowed = history_allowed
        # --replay-window: answers kept per stream (the last chunk's always); --replay-window-bytes: the
        # most bytes they take in a record (the last chunk's answer kept whatever its size).
        self._replay_window = replay_window
        self.replay_window_bytes = replay_window_bytes
        # False while the deployment's record format cannot carry earlier answers (server/state/formats.py).
        self._earlier_allowed = earlier_allowed

    @property
    def replay_window(self) -> int:
        return self._replay_window if self._earlier_allowed() else 1

    def plan(self, index: int, chunk: Chunk, digest: bytes, slot: Loaded) -> Planned | BatchResult:
        """The chunk runs (Planned), or is answered without running: a replay or an error."""
        if chunk.stream_id is None:
            version = self._start_version(chunk)
            if isinstance(version, ServiceError):
                return version
            return Planned(index, chunk, version.zero_state, 0, b"", digest, version=version)
        if type(slot) is SlotRecord and chunk.start_offset == slot.offset and not chunk.reset and not slot.ended:
            # The common case first: the stream's next chunk. No retry or late duplicate starts where the stream
            # is now (`_replay`, `_late_duplicate`), so it continues the sequence.
            return self._continue(index, chunk, digest, slot)
        stream_id = chunk.stream_id
        if isinstance(slot, WrongType):
            return slot_wrong_type(stream_id, slot.key, slot.redis_type)
        if isinstance(slot, NewerRecord):  # never overwritten here, not even by a reset: it may hold more
            return slot_from_newer_release(stream_id, slot.format, NEWEST_FORMAT)
        if isinstance(slot, CorruptRecord):
            if not chunk.reset:
                return slot_unreadable(stream_id, str(slot))
            return self._from_zero(index, chunk, digest, slot.version)
        if slot is not None and (replay := _replay(chunk, digest, slot)) is not None:
            replay.model_version = self.versions.number_of(slot.fingerprint)
            return replay
        if slot is not None and not slot.ended and (duplicate := _late_duplicate(chunk, digest, slot)):
            return duplicate
        if chunk.must_exist and not chunk.reset and (slot is None or slot.ended):
            return stream_not_started(stream_id)
        if slot is None:
            return self._from_zero(index, chunk, digest, b"")
        if chunk.reset or slot.ended:
            return self._from_zero(index, chunk, digest, slot.version)
        return self._continue(index, chunk, digest, slot)

    def _continue(self, index: int, chunk: Chunk, digest: bytes, slot: SlotRecord) -> Planned | ServiceError:
        """The chunk continues the stream's live sequence from its slot, on the version that started it."""
        stream_id = chunk.stream_id or ""
        version = self.versions.by_fingerprint(slot.fingerprint)
        if version is None:
            return self._off_version(index, chunk, digest, slot)
        if chunk.model_version and chunk.model_version != version.number:
            return pinned_to_version(stream_id, self.versions.name, version.number, chunk.model_version)
        if chunk.start_offset is not None and chunk.start_offset != slot.offset:
            return offset_mismatch(stream_id, chunk.start_offset, slot.offset, self.replay_window)
        if slot.state.size != version.zero_state.size:
            return slot_unreadable(
                stream_id, f"the saved state has {slot.state.size} values, the model needs {version.zero_state.size}"
            )
        earlier = slot.earlier
        if len(slot.last_outputs):  # none after a SetStreamState (`set_record`): no answer to keep
            earlier = earlier.with_answer(slot.last_start, slot.last_digest, slot.last_request_id, slot.last_outputs)
        return Planned(index, chunk, slot.state, slot.offset, slot.version, digest,
                       slot.first_digest, slot.first_request_id, slot.recent_requests, earlier,
                       version=version, history=slot.history, history_start=slot.history_start)

    def _off_version(self, index: int, chunk: Chunk, digest: bytes, slot: SlotRecord) -> Planned | ServiceError:
        """The slot was written by a version no longer served here, or by another model (invariants 7, 14)."""
        if self.versions.unresolved(slot.fingerprint):  # never decided on a registry that did not answer
            return redis_unavailable("the model version registry did not answer")
        loading = self.versions.loading_number(slot.fingerprint)
        if loading:  # another replica's version, loaded here for the sequences pinned to it (server/app/models.py)
            return version_loading(chunk.stream_id or "", self.versions.name, loading)
        retired = self.versions.dropped_number(slot.fingerprint)
        newest = self.versions.newest()
        # A chunk may still name its sequence's version (a client pinned to it): the policy moves it all the same.
        if self.on_retired == "replay" and slot.history and newest is not None \
                and chunk.model_version in (0, retired) \
                and slot.history_columns == newest.runner.description.input_features:
            return self._replayed(index, chunk, digest, slot, newest, retired)
        if self.on_retired in ("reset", "replay"):  # replay without kept inputs: reset, and the answer says so
            metrics.MIGRATIONS.labels(self.versions.name, "reset").inc()
            planned = self._from_zero(index, chunk, digest, slot.version, migrating=True)
            if isinstance(planned, Planned):
                planned.migration, planned.migrated_from = "reset", retired
            return planned
        metrics.MIGRATIONS.labels(self.versions.name, "refuse").inc()
        serving = newest.fingerprint.hex() if newest is not None else "none"
        if retired:
            return version_retired(chunk.stream_id or "", self.versions.name, retired,
                                   newest.number if newest is not None else 0)
        return saved_by_other_model(chunk.stream_id or "", slot.fingerprint.hex(), serving)

    def _replayed(self, index: int, chunk: Chunk, digest: bytes, slot: SlotRecord, newest: ServingVersion,
                  retired: int) -> Planned | ServiceError:
        """The sequence goes on at its offset on the newest version, from a state rebuilt there from its kept inputs
        (exact when they reach back to the sequence's start, history_start 0; an approximation otherwise)."""
        stream_id = chunk.stream_id or ""
        if chunk.start_offset is not None and chunk.start_offset != slot.offset:
            return offset_mismatch(stream_id, chunk.start_offset, slot.offset, self.replay_window)
        metrics.MIGRATIONS.labels(self.versions.name, "replay").inc()
        return Planned(index, chunk, newest.zero_state, slot.offset, slot.version, digest,
                       slot.first_digest, slot.first_request_id, slot.recent_requests,
                       slot.earlier.with_answer(slot.last_start, slot.last_digest, slot.last_request_id,
                                                slot.last_outputs),
                       version=newest, migrated_from=retired, migration="replay", history=slot.history,
                       history_start=slot.history_start, replay_inputs=slot.history_inputs())

    def _start_version(self, chunk: Chunk, *, migrating: bool = False) -> ServingVersion | ServiceError:
        """Where a new sequence starts: the version its chunk names, else the newest. A chunk moved off a retired
        version (`migrating`) may name that version (its sequence's): it starts on the newest."""
        if chunk.model_version:
            version = self.versions.get(chunk.model_version)
            if version is not None and version.state == READY:
                return version
            if not migrating:
                return model_version_unavailable(self.versions.name, chunk.model_version,
                                                 self.versions.ready_numbers())
        newest = self.versions.newest()
        if newest is None:
            return model_version_unavailable(self.versions.name, 0, [])
        return newest

    def _from_zero(self, index: int, chunk: Chunk, digest: bytes, version: bytes, *, migrating: bool = False
                   ) -> Planned | ServiceError:
        """The chunk starts a new sequence: it is the one whose late copies are recognised (invariant 10). A chunk
        moved off a retired version (`migrating`) starts one whatever offset it named: its answer says so."""
        if chunk.start_offset not in (None, 0) and not migrating:
            return offset_mismatch(chunk.stream_id or "", chunk.start_offset, 0)
        start = self._start_version(chunk, migrating=migrating)
        if isinstance(start, ServiceError):
            return start
        return Planned(index, chunk, start.zero_state, 0, version, digest, digest,
                       request_id_digest(chunk.request_id), b"", version=start)

    def record_after(self, planned: Planned, output: np.ndarray, state: np.ndarray, now_ms: int) -> SlotRecord:
        """The stream's record once its chunk ran: the new state, and what recognises the chunk's retries
        and late duplicates."""
        chunk = planned.chunk
        recent = planned.recent_requests
        request_id = chunk.request_id
        if request_id:
            recent = (recent + request_digest(request_id, planned.digest))[-RECENT_BYTES:]
        history, history_columns, history_start = (self._history_after(planned) if self.history_timesteps
                                                   else _NO_HISTORY)
        end = chunk.end
        # Positional, in SlotRecord's field order: built once per saved chunk, and keywords cost more.
        return SlotRecord(
            new_version(),
            planned.base_offset + len(chunk.values),  # offset
            now_ms,  # updated_unix_ms
            planned.version.fingerprint,  # type: ignore[union-attr]
            planned.base_offset,  # last_start
            planned.digest,  # last_digest
            request_id_digest(request_id),  # last_request_id
            # Copies: this process keeps the record in memory (server/state/cache.py), and a row of the batch's
            # arrays would keep the whole batch's arrays alive with it.
            state[:0] if end else state.copy(),
            output.copy(),  # last_outputs
            end,  # ended
            planned.first_digest,
            planned.first_request_id,
            recent,  # recent_requests
            # An ended sequence keeps its last answer only: its first chunk again deliberately starts a new one.
            NO_EARLIER if end else self._kept(planned.earlier, output),
            history, history_columns, history_start,
        )

    def _history_after(self, planned: Planned) -> tuple[bytes, int, int]:
        """The stream's kept inputs once the chunk ran: the last history_timesteps of the sequence, and the offset
        of the first. None for an ended sequence, or while the deployment's record format cannot carry them."""
        chunk = planned.chunk
        if not self.history_timesteps or chunk.end or not self._history_allowed():
            return b"", 0, 0
        columns = chunk.values.shape[1]
        kept = planned.history + chunk.values.astype("<f4", copy=False).tobytes()
        limit = 4 * columns * self.history_timesteps
        if len(kept) > limit:
            kept = kept[-limit:]
        end = planned.base_offset + chunk.timesteps
        return kept, columns, end - len(kept) // (4 * columns)

    def _kept(self, earlier: KeptAnswers, last_outputs: np.ndarray) -> KeptAnswers:
        """The newest of `earlier` that fit beside the last answer: replay_window - 1 at most, and their
        bytes with the last answer's within replay_window_bytes."""
        return earlier.newest(self.replay_window - 1, self.replay_window_bytes - 4 * last_outputs.size)


def _replay(chunk: Chunk, digest: bytes, slot: SlotRecord) -> Prediction | None:
    """The stored answer when the chunk is a retry of one of the sequence's kept chunks, newest first."""
    if chunk.start_offset is not None and chunk.start_offset == slot.offset and not chunk.reset:
        return None  # the next chunk of the stream (the common case): every kept chunk started before it
    stream_id = chunk.stream_id or ""
    if _is_retry(chunk, digest, slot.last_start, slot.last_digest, slot.last_request_id):
        return Prediction(stream_id, slot.last_outputs, slot.offset, True, chunk.request_id)
    for answer in reversed(slot.earlier):
        if _is_retry(chunk, digest, answer.start, answer.digest, answer.request_id):
            return Prediction(stream_id, answer.outputs, answer.start + chunk.timesteps, True, chunk.request_id)
    return None


def _is_retry(chunk: Chunk, digest: bytes, start: int, applied_digest: bytes, applied_request_id: bytes) -> bool:
    """Whether the chunk is a retry of the applied chunk with this start offset and these digests."""
    if applied_digest != digest:
        return False
    if chunk.reset:
        # The digest covers the reset flag, so the applied chunk was this reset (at offset 0): the same
        # request id, or none on both, makes it a retry; another request id, a deliberate restart.
        return request_id_digest(chunk.request_id) == applied_request_id and chunk.start_offset in (None, 0)
    if chunk.start_offset is not None:
        return chunk.start_offset == start
    return bool(chunk.request_id) and request_id_digest(chunk.request_id) == applied_request_id


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


def set_record(state: np.ndarray, offset: int, fingerprint: bytes, now_ms: int) -> SlotRecord:
    """The stream's record after SetStreamState (invariant 15): a new sequence at `offset` from `state`, with no
    answer kept and fresh digests (random, matching no chunk's data), so no retry or late duplicate of a chunk
    from before the set is taken for one of it: the next chunk starting at `offset` runs, others are refused by
    the offset rule. Without earlier answers it is written in format 2, which every release that may serve
    beside this one reads (server/state/formats.py)."""
    return SlotRecord(
        version=new_version(),
        offset=offset,
        updated_unix_ms=now_ms,
        fingerprint=fingerprint,
        last_start=offset,
        last_digest=secrets.token_bytes(16),
        last_request_id=bytes(REQUEST_DIGEST_SIZE),
        state=np.array(state, dtype=np.float32),
        last_outputs=np.zeros((0, 0), np.float32),  # no answer: none is replayed, none kept (`_continue`)
        first_digest=secrets.token_bytes(16),
        first_request_id=bytes(REQUEST_DIGEST_SIZE),
        recent_requests=b"",
        earlier=NO_EARLIER,
    )
