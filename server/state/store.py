"""Redis state store: one key per stream (keys.py), loaded and saved a whole batch per round trip.

Saves are compare-and-set on the record's version token (a Lua script, scripts.py, so the check and the
write are one atomic step on the server): a crash at any instant leaves the old record or the new one,
and two replicas can never both apply a chunk to the same base (invariant 5 in docs/invariants.md).
Every call is bounded by the caller's deadline, not by a socket timeout (invariant 9, attempts.py).

- Reads (loads, inspections) and idempotent writes (deletes) are retried with backoff until the deadline.
- A save is idempotent too: each record carries the random version it writes, and the script answers
  "already applied" when it finds that version in place. So when a save's answer is lost (timeout,
  dropped connection), the same script is sent again until Redis answers or the deadline passes:
  Redis' answer then says for every key whether the chunk was applied. A copy of the script still
  queued in Redis from the lost attempt can no longer apply later: it finds the new version, or another
  one, where it expects the old. Only when Redis stays silent until the deadline is the outcome unknown.
- Each key of a batch is written on its own (`redis.pcall`): a key that cannot be written (a value of
  another type under a stream's name, an out-of-memory Redis) fails that stream alone, with its own
  error, and every other stream of the batch is saved normally. A stream's record is one SET: all or
  nothing per stream.

`load_recent` may take a slot from the records this process saved last (cache.py) instead of Redis: only
as the base of a compare-and-set save, which Redis refuses when anything else wrote the key since.

`save` and `load` group their keys by Redis node (`routing.py`: one group on one node; per node, and
within it per slot, on a Redis Cluster): one round trip per node, the nodes concurrently, each with its
own retries until the deadline, so a slow or failing node costs only its own streams. With
`--redis-wait-replicas` a write is acknowledged only once WAIT confirms it (invariant 8).
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from server.errors import (
    ServiceError,
    answer_unconfirmed,
    outcome_unknown,
    redis_unavailable,
    replication_unconfirmed,
    slot_wrong_type,
)
from server.state import scripts
from server.state.attempts import LOST_ANSWER_ERRORS, Attempts, GaveUp, P
from server.state.cache import SavedSlots
from server.state.connection import AsyncClient, RedisTopology, connect
from server.state.keys import KeyLayout
from server.state.record import DECODED_OVERHEAD_BYTES, CorruptRecord, SlotRecord
from server.state.routing import NO_WAIT, NodeGroup, NodeRouter, WaitPolicy


class Applied:
    """A save result: the record is in Redis (written now, or by an earlier send of the same save)."""


class Refused:
    """A save result: the key holds another version (another writer was first); nothing was written."""


APPLIED = Applied()
REFUSED = Refused()
SaveResult = Applied | Refused | ServiceError


@dataclass(frozen=True, slots=True)
class WrongType:
    """The stream's key holds a value of another Redis type (a hash, a list ...): not ours to touch."""

    key: str
    redis_type: str


@dataclass(slots=True)  # one per saved chunk: not frozen, for the cheaper __init__ (server/types.py, Chunk)
class SlotWrite:
    stream_id: str
    expected_version: bytes  # b"" when the key must not exist
    record: SlotRecord | None  # None deletes the slot
    ttl_ms: int
    tenant: str = ""  # "" on a server without API keys


Loaded = SlotRecord | CorruptRecord | WrongType | None


class StateStore:
    def __init__(self, redis: str | RedisTopology, key_prefix: str, *, wait: WaitPolicy = NO_WAIT,
                 saved_slots: SavedSlots[SlotRecord] | None = None) -> None:
        topology = redis if isinstance(redis, RedisTopology) else RedisTopology(redis)
        self.keys = KeyLayout(key_prefix)
        # What this process saved last, per key (cache.py); None: every load reads Redis.
        self._saved = saved_slots
        # While Redis did not answer the last call, slots are read, not taken from memory: a chunk whose
        # first Redis call is its save can only be answered "outcome unknown" when Redis is gone, one whose
        # read fails is surely "not applied".
        self._attempt = Attempts()
        # Bounds calls that have no caller behind them (health checks) and each connection attempt.
        self.timeout_s = topology.timeout_s
        # No socket timeout and no automatic resends (connection.py): every call here is bounded by its
        # caller's deadline, and a save is only ever resent by this module, knowing what a resend means.
        self._redis = connect(topology)
        self._router = NodeRouter(self._redis, wait)
        self._reset_script = self._redis.register_script(scripts.RESET)

    def key(self, stream_id: str, tenant: str = "") -> str:
        return self.keys.slot(stream_id, tenant)

    def namespaced(self, model: str) -> StateStore:
        """The same store (connection, slot memory, retries) over one model's stream namespace (keys.py);
        itself for the namespace without a model. Closing the root store closes them all."""
        if model == self.keys.model:
            return self
        view = copy.copy(self)
        view.keys = self.keys.namespaced(model)
        return view

    @property
    def waits_for_replicas(self) -> bool:
        return self._router.wait.replicas > 0

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                return bool(await self._redis.ping())
        except (*LOST_ANSWER_ERRORS, redis_errors.RedisError):
            return False

    async def used_memory(self) -> int | None:
        """Bytes Redis uses (INFO memory's `used_memory`): on a Cluster the sum over its masters, the nodes this
        store writes to (replicas hold copies, not more streams). None when any node does not answer in time."""
        try:
            async with asyncio.timeout(self.timeout_s):
                if isinstance(self._redis, RedisCluster):
                    await self._redis.initialize()  # the masters are known once the client has met the cluster
                    answers = [await self._redis.info("memory", target_nodes=node)
                               for node in self._redis.get_primaries()]
                else:
                    answers = [await self._redis.info("memory")]
        except (*LOST_ANSWER_ERRORS, redis_errors.RedisError):
            return None
        return sum(int(answer["used_memory"]) for answer in answers) if answers else None

    @property
    def client(self) -> AsyncClient:
        """The Redis connection, for the state layer's other keys: tenants' live streams (live.py), the record
        format (formats.py)."""
        return self._redis

    async def run(self, call: Callable[[], Awaitable[P]], deadline: float) -> P:
        """An idempotent command (or pipeline) of another state module (server/state/live.py), retried as
        the store's own reads are until the deadline; past it, UNAVAILABLE with nothing applied."""
        try:
            return await self._attempt(call, deadline)
        except GaveUp as exc:
            raise redis_unavailable(exc.detail) from exc

    @property
    def saved_slots(self) -> SavedSlots[SlotRecord] | None:
        return self._saved

    async def load_recent(self, stream_ids: Sequence[str], deadline: float, tenants: Sequence[str],
                          usable: Sequence[bool]) -> tuple[list[Loaded], list[bool]]:
        """Like `load`, but a slot this process saved last is taken from memory where `usable` allows;
        the second list says which were. Such a slot may be stale: it may only be the base of a save, whose
        compare-and-set then finds out (server/dataplane/processor.py asks Redis before any other answer)."""
        saved = self._saved
        if saved is None or not self._attempt.answering:
            return await self.load(stream_ids, deadline, tenants), [False] * len(stream_ids)
        loaded: list[Loaded] = [None] * len(stream_ids)
        hits = [False] * len(stream_ids)
        missing: list[int] = []
        for i, (stream_id, tenant, allowed) in enumerate(zip(stream_ids, tenants, usable, strict=True)):
            data = saved.get(self.key(stream_id, tenant)) if allowed else None
            if data is None:
                missing.append(i)
            else:
                loaded[i] = data  # the record this process saved last, as it encoded it
                hits[i] = True
        if missing:
            fresh = await self.load([stream_ids[i] for i in missing], deadline, [tenants[i] for i in missing])
            for i, slot in zip(missing, fresh, strict=True):
                loaded[i] = slot
        return loaded, hits

    async def load(self, stream_ids: Sequence[str], deadline: float, tenants: Sequence[str] | None = None
                   ) -> list[Loaded]:
        """Every slot of a batch, one round trip per Redis node; None where a stream has no slot.
        `tenants`: each stream's tenant (invariant 13), when the server has API keys.

        Raises ServiceError (UNAVAILABLE, nothing applied) when a node does not answer before the deadline."""
        if not stream_ids:
            return []
        if tenants is None:
            keys = [self.key(s) for s in stream_ids]
        else:
            keys = [self.key(s, t) for s, t in zip(stream_ids, tenants, strict=True)]
        loaded: list[Loaded] = [None] * len(keys)

        async def node(group: NodeGroup) -> None:
            try:
                values = await self._attempt(lambda: self._load_group(keys, group), deadline)
            except GaveUp as exc:
                raise redis_unavailable(exc.detail) from exc
            for i, value in zip(group.indices, values, strict=True):
                loaded[i] = value

        await _all(node(group) for group in await self._router.groups(keys))
        return loaded

    async def _load_group(self, keys: list[str], group: NodeGroup) -> list[Loaded]:
        # MGET answers nil for a key of another type; EXISTS counts it, so such keys cost one more look.
        loaded: list[Loaded] = []
        odd: list[str] = []
        for slot, (raw, existing) in zip(group.slots, await self._router.read(keys, group), strict=True):
            loaded += [self._decode(data) for data in raw]
            if existing > sum(data is not None for data in raw):
                odd += [keys[i] for i, data in zip(slot, raw, strict=True) if data is None]
        if odd:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in odd:
                    pipe.type(key)
                kinds = dict(zip(odd, await pipe.execute(), strict=True))
            for n, i in enumerate(group.indices):
                kind = kinds.get(keys[i])
                kind = kind.decode() if isinstance(kind, bytes) else kind
                if kind not in (None, "none"):
                    loaded[n] = WrongType(keys[i], kind)
        return loaded

    @staticmethod
    def _decode(data: bytes | None) -> Loaded:
        if data is None:
            return None
        try:
            return SlotRecord.decode(data)
        except CorruptRecord as exc:
            return exc

    async def save(self, writes: Sequence[SlotWrite], deadline: float) -> list[SaveResult]:
        """Compare-and-set every write of a batch, one round trip per Redis node; one result per write:
        APPLIED, REFUSED (another version in place; nothing written), or the ServiceError of that stream
        (not applied; the outcome unknown when Redis stayed silent until the deadline; or applied on the
        master but not confirmed by enough replicas)."""
        results: list[SaveResult] = [REFUSED] * len(writes)
        keys = [self.key(w.stream_id, w.tenant) for w in writes]
        records = [w.record.encode() if w.record else b"" for w in writes]

        async def node(group: NodeGroup) -> None:
            done = await self._save_group(writes, keys, records, group, deadline)
            for i, result in zip(group.indices, done, strict=True):
                results[i] = result

        await _all(node(group) for group in await self._router.groups(keys))
        return results

    async def _save_group(self, writes: Sequence[SlotWrite], keys: list[str], records: list[bytes],
                          group: NodeGroup, deadline: float) -> list[SaveResult]:
        # Indexed like `writes`: the router picks the group's items by their index in the batch.
        items = [(key, (write.expected_version, record, write.record.version if write.record else b"", write.ttl_ms))
                 for key, write, record in zip(keys, writes, records, strict=True)]
        saved = self._saved
        try:
            done = await self._attempt(lambda: self._router.run_script(scripts.SAVE, items, group), deadline,
                                       write=True)
        except GaveUp as exc:
            if saved is not None:
                for i in group.indices:
                    saved.drop(keys[i])
            if exc.maybe_ran:
                return [outcome_unknown(writes[i].stream_id, exc.detail) for i in group.indices]
            return [redis_unavailable(exc.detail) for _ in group.indices]
        results = [self._save_result(writes[i], keys[i], reply)
                   for i, reply in zip(group.indices, done.results, strict=True)]
        for n, i in enumerate(group.indices):
            if i in done.unconfirmed and results[n] is APPLIED:
                results[n] = self._unconfirmed(done.unconfirmed[i])
            if saved is not None:
                # Kept only what Redis now holds under the key (applied and, with WAIT, confirmed).
                if results[n] is APPLIED and records[i]:
                    saved.put(keys[i], writes[i].record, writes[i].ttl_ms, len(records[i]) + DECODED_OVERHEAD_BYTES)
                elif results[n] is REFUSED:
                    saved.roam(keys[i])  # written elsewhere too: its chunks read Redis for a while
                else:
                    saved.drop(keys[i])
        return results

    async def confirm(self, stream_ids: Sequence[str], versions: Sequence[bytes], deadline: float,
                      tenants: Sequence[str] | None = None) -> list[ServiceError | Refused | None]:
        """With --redis-wait-replicas, before an answer that ends in no save (a replayed retry, a refusal)
        is given: per stream None where the master still holds the version the answer was decided on
        (b"": no slot) and replicas confirm it; REFUSED where it holds another (a stale read: decide again);
        else the error to answer instead (nothing is acknowledged yet). One round trip per node, on the
        connection WAIT asks about (scripts.CONFIRM)."""
        if not stream_ids or not self.waits_for_replicas:
            return [None] * len(stream_ids)
        keys = [self.key(s, t) for s, t in zip(stream_ids, tenants or [""] * len(stream_ids), strict=True)]
        items = [(key, (version,)) for key, version in zip(keys, versions, strict=True)]
        answers: list[ServiceError | Refused | None] = [None] * len(keys)

        async def node(group: NodeGroup) -> None:
            try:
                done = await self._attempt(lambda: self._router.run_script(scripts.CONFIRM, items, group), deadline)
            except GaveUp as exc:
                for i in group.indices:
                    answers[i] = redis_unavailable(
                        exc.detail, action="nothing was applied by this attempt; retry the chunk", outcome=None)
                return
            for i, same in zip(group.indices, done.results, strict=True):
                if not same:
                    answers[i] = REFUSED
            wait = self._router.wait
            for i, replicas in done.unconfirmed.items():
                if answers[i] is None:
                    answers[i] = answer_unconfirmed(replicas, wait.replicas, wait.timeout_ms)

        await _all(node(group) for group in await self._router.groups(keys))
        return answers

    def _unconfirmed(self, replicas: int | None) -> ServiceError:
        return replication_unconfirmed(replicas, self._router.wait.replicas, self._router.wait.timeout_ms)

    @staticmethod
    def _save_result(write: SlotWrite, key: str, reply: int | bytes) -> SaveResult:
        if reply in (1, 2):
            return APPLIED
        if reply == 0:
            return REFUSED
        text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
        if text.startswith("WRONGTYPE "):
            return slot_wrong_type(write.stream_id, key, text.removeprefix("WRONGTYPE "))
        # The key was readable and held the expected version, but Redis refused the write (out of memory,
        # read-only replica, too few replicas): nothing was written for this stream.
        return redis_unavailable(f"Redis refused to write the stream's key: {text.removeprefix('ERR ')}")

    async def delete(self, stream_id: str, deadline: float, tenant: str = "") -> bool:
        """Remove the slot (any type of value under the key); True if the stream existed: its key held
        anything but the record of an ended stream, which GetStream reports as gone too. Deleting is
        idempotent, so it is resent until the deadline."""
        key = self.key(stream_id, tenant)
        try:
            return await self._attempt(lambda: self._reset_script(keys=[key]), deadline) == scripts.RESET_LIVE
        except GaveUp as exc:
            raise redis_unavailable(exc.detail, action="the stream may or may not have been reset; retry it",
                                    outcome=None) from exc
        finally:
            # After the DEL: a save of this stream under way meanwhile may have kept its record. (One kept
            # even later is harmless: the next chunk's compare-and-set finds the key gone and refuses it.)
            if self._saved is not None:
                self._saved.drop(self.key(stream_id, tenant))

    async def inspect(self, stream_id: str, deadline: float, tenant: str = "") -> tuple[Loaded, int]:
        """The slot and its remaining time to live in ms (-2 when missing, as PTTL says)."""
        try:
            return await self._attempt(lambda: self._inspect(stream_id, tenant), deadline)
        except GaveUp as exc:
            raise redis_unavailable(exc.detail, action="retry it", outcome=None) from exc

    async def _inspect(self, stream_id: str, tenant: str) -> tuple[Loaded, int]:
        key = self.key(stream_id, tenant)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            pipe.type(key)
            data, ttl, kind = await pipe.execute(raise_on_error=False)
        if isinstance(data, redis_errors.ResponseError) and str(data).startswith("WRONGTYPE"):
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            return WrongType(key, kind), int(ttl)
        if isinstance(data, BaseException):
            raise data
        return self._decode(data), int(ttl)

    async def close(self) -> None:
        await self._redis.aclose()


async def _all(calls: Iterable[Awaitable[None]]) -> None:
    """Run the per-node calls concurrently; every one finishes before the first error is raised."""
    pending = list(calls)
    if len(pending) == 1:
        # One node (always, outside a cluster): awaited in place. gather() would wrap it in a task, which
        # costs two turns of the event loop per Redis call.
        await pending[0]
        return
    outcomes = await asyncio.gather(*pending, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


def now_unix_ms() -> int:
    return time.time_ns() // 1_000_000
