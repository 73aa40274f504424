"""The records this process saved last, kept in memory so a stream's next chunk can skip its Redis read.

Redis stays the only truth: an entry is the record this process wrote under a key (kept decoded, so its next
chunk needs no decoding: the bytes in Redis are its encoding), with the version token it carries, and is only
ever used as the base of a compare-and-set. A save expects that version
in place (server/state/store.py); if anything else wrote the key since (another replica, a reset, an
expiry, a failover that lost the write), the save is refused and the chunk runs again from Redis. So a
stale entry costs a retry, never a wrong answer (invariants 4, 5 and 9, docs/invariants.md). Answers
that do not end in a save (a replayed retry, a refused chunk) are decided from Redis, not from here
(server/dataplane/processor.py).

A stream whose key another writer changed (a refused save: its chunks go to several replicas, as
unary calls behind a least-request balancer do) is marked roaming for `roaming_s` (--slot-memory-roaming-s):
its record is not kept meanwhile, so its chunks read Redis instead of running twice on stale memory. A
stream that keeps hopping between replicas then costs one chunk run twice per replica per `roaming_s`.

Bounded (invariant 12): least recently used entries go first once the entries' bytes (key, record and
the dictionary's own share) pass the budget, and an entry is dropped when the key's time to live in Redis
would have passed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Generic, TypeVar

Record = TypeVar("Record")

# What an entry costs besides its key's and its record's bytes: the dictionary's node, the tuple, the float
# and the objects' headers (146 bytes measured with tracemalloc on CPython 3.11).
ENTRY_OVERHEAD_BYTES = 160


class SavedSlots(Generic[Record]):
    """Records by key; each entry counts the bytes of its record's encoding (`size`, the bytes themselves by
    default) besides its key and ENTRY_OVERHEAD_BYTES."""

    def __init__(self, max_bytes: int, roaming_s: float) -> None:
        self.max_bytes = max_bytes
        self.roaming_s = roaming_s  # how long a roaming stream's chunks read Redis before memory is tried again
        # key -> (record, or None for a roaming mark; monotonic time the entry lapses; bytes counted)
        self._entries: OrderedDict[str, tuple[Record | None, float, int]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> Record | None:
        """The record saved last under `key`; None when there is none (or the stream is roaming)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            self.drop(key)
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, record: Record, ttl_ms: int, size: int | None = None) -> None:
        """Redis now holds `record` under `key` (this process wrote it), for ttl_ms. `size`: the bytes of its
        encoding (by default `len(record)`: the record is its bytes)."""
        entry = self._entries.get(key)
        if entry is not None and entry[0] is None and entry[1] > time.monotonic():
            return  # roaming: its next chunk reads Redis anyway
        # Counted from after Redis answered, so an entry may outlive the key by a round trip: a chunk
        # run on it is then refused by the compare-and-set (the key is gone) and runs again from Redis.
        self._keep(key, record, time.monotonic() + ttl_ms / 1000,
                   len(record) if size is None else size)  # type: ignore[arg-type]

    def roam(self, key: str) -> None:
        """Another writer changed `key` under this process: keep no record of it for `roaming_s`."""
        self._keep(key, None, time.monotonic() + self.roaming_s, 0)

    def drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[2]

    def _keep(self, key: str, record: Record | None, until: float, record_size: int) -> None:
        self.drop(key)
        # What the entry holds in memory, roughly: its key, its record (none for a roaming mark), the rest.
        size = ENTRY_OVERHEAD_BYTES + len(key) + record_size
        if size > self.max_bytes:
            return
        self._entries[key] = (record, until, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, _, old_size) = self._entries.popitem(last=False)
            self._bytes -= old_size
