"""State out and in (invariant 15, docs/invariants.md): read a stream's live slot, and replace it whole.

What the data plane's GetStreamState and SetStreamState do with Redis, apart from which model and version
they concern (server/dataplane/plane.py decides that, and splits and joins the state by name:
server/model/state_layout.py). A set is the data path's own compare-and-set (server/state/store.py `save`),
expecting the version of the slot it read: a chunk saved in between makes it read again and retry until
the deadline, since a set replaces the slot whole. Its record (rules.py `set_record`) starts a new sequence
at the given offset; this process's slot memory keeps it like any saved record, so the stream's next chunk
here continues from it.
"""

from __future__ import annotations

import time

import numpy as np

from server.dataplane.rules import set_record
from server.errors import (
    ServiceError,
    slot_from_newer_release,
    slot_wrong_type,
    state_kept_changing,
    stream_not_found,
    tenant_streams_exceeded,
)
from server.state.live import Change, LiveChange, LiveStreams
from server.state.record import NEWEST_FORMAT, CorruptRecord, NewerRecord, SlotRecord
from server.state.store import APPLIED, Loaded, SlotWrite, StateStore, WrongType, now_unix_ms


async def live_slot(store: StateStore, stream_id: str, deadline: float, tenant: str = "") -> SlotRecord:
    """The stream's slot, read from Redis; NOT_FOUND when the stream has no state (GetStream's `exists` false:
    never seen, ended, reset, expired, or unreadable), the errors GetStream gives for a key of another type
    or a newer release's record."""
    slot, _ = await store.inspect(stream_id, deadline, tenant)
    if isinstance(slot, WrongType):
        raise slot_wrong_type(stream_id, slot.key, slot.redis_type)
    if isinstance(slot, NewerRecord):
        raise slot_from_newer_release(stream_id, slot.format, NEWEST_FORMAT)
    if slot is None or isinstance(slot, CorruptRecord) or slot.ended:
        raise stream_not_found(stream_id)
    return slot


async def replace_slot(store: StateStore, stream_id: str, state: np.ndarray, offset: int, fingerprint: bytes, *,
                       ttl_ms: int, deadline: float, tenant: str = "", live: LiveStreams | None = None,
                       live_member: str | None = None) -> None:
    """Write a new sequence at `offset` from `state` (float32 [state_size], already checked) over whatever the
    stream's key holds but a key of another type or a newer release's record, in one compare-and-set.
    `live`: a tenant's live-stream count, which a stream without live state joins as a first chunk does
    (RESOURCE_EXHAUSTED past its limit); `live_member`: the stream as that count names it (its id)."""
    while True:
        [slot] = await store.load([stream_id], deadline, [tenant])
        if isinstance(slot, WrongType):
            raise slot_wrong_type(stream_id, slot.key, slot.redis_type)
        if isinstance(slot, NewerRecord):  # never overwritten here, as no chunk overwrites one
            raise slot_from_newer_release(stream_id, slot.format, NEWEST_FORMAT)
        if live is not None and tenant:
            await _admit(live, tenant, live_member or stream_id, slot, deadline)
        record = set_record(state, offset, fingerprint, now_unix_ms())
        expected = slot.version if slot is not None else b""
        [result] = await store.save([SlotWrite(stream_id, expected, record, ttl_ms, tenant)], deadline)
        if result is APPLIED:
            return
        if isinstance(result, ServiceError):
            raise result
        # REFUSED: a chunk was saved between the read and the write; read again.
        if time.monotonic() >= deadline:
            raise state_kept_changing(stream_id)


async def _admit(live: LiveStreams, tenant: str, member: str, slot: Loaded, deadline: float) -> None:
    is_live = slot is not None and not (isinstance(slot, SlotRecord) and slot.ended)  # as rules.live_change says
    change = Change.CONTINUE if is_live else Change.NEW
    [allowed] = await live.apply([LiveChange(tenant, member, change)], now_unix_ms(), deadline)
    if not allowed:
        raise tenant_streams_exceeded(tenant, live.limit_of(tenant), "the state was not set")
