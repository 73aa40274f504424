"""Live streams per tenant, for the per-tenant stream limit (`max_streams`; invariant 12, docs/invariants.md).

Each limited tenant has one sorted set (its `live` key in server/state/keys.py, which never equals a
stream's key), holding its live streams' ids scored by the time they last ran a chunk. A stream is live
from its first chunk until a chunk ends it, ResetStream forgets it, or it is idle for the state TTL:
members older than the TTL are pruned before each count, the same TTL that expires the stream's state,
so the set follows the states without a scan of Redis.

The count is exact across replicas: one Lua script per tenant prunes, counts, admits new streams while
the count is below the limit, refreshes continuing ones and removes ending ones in one atomic step, so
two replicas admitting at once cannot both take the last place. Only batches holding a limited tenant's
chunks pay for it: one extra pipelined round trip, before the model call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from server.state.store import StateStore

# KEYS[1]: the tenant's set. ARGV: now ms, prune-below ms, limit, ttl ms, then (op, stream id) pairs.
# Returns 1 for each pair that may run, 0 for a new stream past the limit.
_UPDATE = """
local key = KEYS[1]
local now, limit = ARGV[1], tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. ARGV[2])
local count = redis.call('ZCARD', key)
local results = {}
for i = 5, #ARGV, 2 do
  local op, member = ARGV[i], ARGV[i + 1]
  local ok = 1
  if op == 'end' then
    count = count - redis.call('ZREM', key, member)
  elseif op == 'new' and count >= limit and not redis.call('ZSCORE', key, member) then
    ok = 0
  else
    count = count + redis.call('ZADD', key, now, member)
  end
  results[#results + 1] = ok
end
if count > 0 then
  redis.call('PEXPIRE', key, ARGV[4])
end
return results
"""


class Change(Enum):
    NEW = "new"  # the stream has no live state: counts against the limit
    CONTINUE = "continue"  # already live: refreshed, never refused (even after the limit was lowered)
    END = "end"  # its chunk ends it: no longer live


@dataclass(frozen=True, slots=True)
class LiveChange:
    tenant: str
    stream_id: str
    change: Change


class LiveStreams:
    """Every call is idempotent (a repeated admission finds its stream already counted), so the store
    resends it until the caller's deadline, like its own reads (invariant 9)."""

    def __init__(self, store: StateStore, state_ttl_ms: int, limit_of: Callable[[str], int]) -> None:
        self._store = store
        self._redis = store.client
        self._state_ttl_ms = state_ttl_ms
        self.limit_of = limit_of  # the tenant's max_streams; 0: not limited, and not counted
        self._update = self._redis.register_script(_UPDATE)

    def key(self, tenant: str) -> str:
        return self._store.keys.live(tenant)

    async def apply(self, changes: Sequence[LiveChange], now_ms: int, deadline: float) -> list[bool]:
        """Record a batch's changes; False where a new stream is refused for its tenant's limit."""
        by_tenant: dict[str, list[int]] = {}
        for index, change in enumerate(changes):
            if self.limit_of(change.tenant) > 0:
                by_tenant.setdefault(change.tenant, []).append(index)
        allowed = [True] * len(changes)
        if not by_tenant:
            return allowed
        calls = []
        for tenant, indexes in by_tenant.items():
            args: list[str | int] = [now_ms, now_ms - self._state_ttl_ms, self.limit_of(tenant), self._state_ttl_ms]
            for index in indexes:
                args += [changes[index].change.value, changes[index].stream_id]
            calls.append((self.key(tenant), args))

        async def update() -> list[list[int]]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, args in calls:
                    await self._update(keys=[key], args=args, client=pipe)
                return await pipe.execute()

        replies = await self._store.run(update, deadline)
        for indexes, reply in zip(by_tenant.values(), replies, strict=True):
            for index, ok in zip(indexes, reply, strict=True):
                allowed[index] = bool(ok)
        return allowed

    async def forget(self, tenant: str, stream_id: str, deadline: float) -> None:
        """ResetStream dropped the stream's state: it is no longer live."""
        if self.limit_of(tenant) > 0:
            await self._store.run(lambda: self._redis.zrem(self.key(tenant), stream_id), deadline)
