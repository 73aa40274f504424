"""Redis state store: one key per stream, loaded and saved a whole batch per round trip.

Key layout: `<prefix>:{<stream_id>}`, or `<prefix>:<tenant>:{<stream_id>}` with API keys: each tenant
its own namespace (invariant 13, docs/invariants.md). A tenant name is 1-64 of [A-Za-z0-9_.-], never a
brace, so no tenant's key can equal another tenant's or a key without tenant. The braces are a Redis
Cluster hash tag, so everything kept for one stream lands on one cluster slot. Saves are
compare-and-set on the record's version token (a Lua script, so the check and the write are one
atomic step on the server): a crash at any instant leaves the old record or the new one, and two
replicas can never both apply a chunk to the same base.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import grpc
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from server.errors import ServiceError, redis_unavailable
from server.state.record import VERSION_SIZE, CorruptRecord, SlotRecord

# KEYS: slot keys. ARGV: for each key, (expected version, new record, ttl ms).
# Expected version "" means the key must not exist; a new record "" means delete the key.
_COMPARE_AND_SET = f"""
local results = {{}}
for i, key in ipairs(KEYS) do
  local expected = ARGV[3 * i - 2]
  local record = ARGV[3 * i - 1]
  local current = redis.call('GETRANGE', key, 0, {VERSION_SIZE - 1})
  if current == expected then
    if record == '' then
      redis.call('DEL', key)
    else
      redis.call('SET', key, record, 'PX', ARGV[3 * i])
    end
    results[i] = 1
  else
    results[i] = 0
  end
end
return results
"""

# Connection-level trouble: the caller may retry later. Anything else from Redis is a bug here.
_UNAVAILABLE_ERRORS = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ReadOnlyError,
    OSError,
)

P = ParamSpec("P")
R = TypeVar("R")


def _redis_errors_as_status(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except _UNAVAILABLE_ERRORS as exc:
            raise redis_unavailable(str(exc) or type(exc).__name__) from exc
        except redis_errors.RedisError as exc:
            raise ServiceError(grpc.StatusCode.INTERNAL, f"state store error: {exc}") from exc

    return wrapper


@dataclass(frozen=True, slots=True)
class SlotWrite:
    stream_id: str
    expected_version: bytes  # b"" when the key must not exist
    record: SlotRecord | None  # None deletes the slot
    ttl_ms: int
    tenant: str = ""  # "" on a server without API keys


Loaded = SlotRecord | CorruptRecord | None


class StateStore:
    def __init__(self, redis_url: str, key_prefix: str = "lstm", *, timeout_s: float = 2.0) -> None:
        self.redis_url = redis_url
        self.key_prefix = key_prefix
        self._redis = aioredis.Redis.from_url(
            redis_url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=30,
        )
        self._compare_and_set = self._redis.register_script(_COMPARE_AND_SET)

    def key(self, stream_id: str, tenant: str = "") -> str:
        if tenant:
            return f"{self.key_prefix}:{tenant}:{{{stream_id}}}"
        return f"{self.key_prefix}:{{{stream_id}}}"

    @property
    def client(self) -> aioredis.Redis:
        """The Redis connection, for the tenant bookkeeping that shares it (server/state/live.py)."""
        return self._redis

    @_redis_errors_as_status
    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    @_redis_errors_as_status
    async def load(self, stream_ids: Sequence[str], tenants: Sequence[str] | None = None) -> list[Loaded]:
        """Every slot of a batch in one MGET; None where a stream has no slot. `tenants`: each stream's."""
        if not stream_ids:
            return []
        if tenants is None:
            keys = [self.key(s) for s in stream_ids]
        else:
            keys = [self.key(s, t) for s, t in zip(stream_ids, tenants, strict=True)]
        raw = await self._redis.mget(keys)
        return [self._decode(data) for data in raw]

    @staticmethod
    def _decode(data: bytes | None) -> Loaded:
        if data is None:
            return None
        try:
            return SlotRecord.decode(data)
        except CorruptRecord as exc:
            return exc

    @_redis_errors_as_status
    async def save(self, writes: Sequence[SlotWrite]) -> list[bool]:
        """Compare-and-set every write of a batch in one script call; True where it was applied."""
        if not writes:
            return []
        keys = [self.key(w.stream_id, w.tenant) for w in writes]
        args: list[bytes | int] = []
        for write in writes:
            args += [write.expected_version, write.record.encode() if write.record else b"", write.ttl_ms]
        applied = await self._compare_and_set(keys=keys, args=args)
        return [bool(flag) for flag in applied]

    @_redis_errors_as_status
    async def delete(self, stream_id: str, tenant: str = "") -> bool:
        return bool(await self._redis.delete(self.key(stream_id, tenant)))

    @_redis_errors_as_status
    async def inspect(self, stream_id: str, tenant: str = "") -> tuple[Loaded, int]:
        """The slot and its remaining time to live in ms (-2 when missing, as PTTL says)."""
        key = self.key(stream_id, tenant)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            data, ttl = await pipe.execute()
        return self._decode(data), int(ttl)

    async def close(self) -> None:
        await self._redis.aclose()


def now_unix_ms() -> int:
    return time.time_ns() // 1_000_000
