"""Redis state store: one key per stream, loaded and saved a whole batch per round trip.

Key layout: `<prefix>:{<stream_id>}`. The braces are a Redis Cluster hash tag, so everything kept
for one stream lands on one cluster slot. Saves are compare-and-set on the record's version token
(a Lua script, so the check and the write are one atomic step on the server): a crash at any instant
leaves the old record or the new one, and two replicas can never both apply a chunk to the same base.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import grpc
from redis import exceptions as redis_errors

from server.errors import ServiceError, redis_unavailable, replication_unconfirmed
from server.state.connection import RedisTopology, connect
from server.state.record import VERSION_SIZE, CorruptRecord, SlotRecord
from server.state.routing import NodeRouter, WaitPolicy

# KEYS: slot keys, all in one cluster slot (routing.py groups them). ARGV: for each key, (expected
# version, new record, ttl ms).
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

# KEYS: slot keys. A write that changes nothing (the same remaining time to live) but is replicated: a
# WAIT after it on the same connection confirms that replicas hold everything written to these keys so
# far, which is what a replayed answer needs before it may be acknowledged.
_TOUCH = """
local results = {}
for i, key in ipairs(KEYS) do
  local ttl = redis.call('PTTL', key)
  if ttl > 0 then
    redis.call('PEXPIRE', key, ttl)
  end
  results[i] = 1
end
return results
"""

# Connection-level trouble: the caller may retry later. Anything else from Redis is a bug here.
_UNAVAILABLE_ERRORS = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ReadOnlyError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.MasterDownError,
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


Loaded = SlotRecord | CorruptRecord | None


class StateStore:
    def __init__(self, redis: str | RedisTopology, key_prefix: str = "lstm", *, timeout_s: float = 2.0,
                 wait: WaitPolicy | None = None) -> None:
        topology = redis if isinstance(redis, RedisTopology) else RedisTopology(redis, timeout_s=timeout_s)
        self.redis_url = topology.url
        self.key_prefix = key_prefix
        self._redis = connect(topology)
        self._router = NodeRouter(self._redis, wait or WaitPolicy())

    def key(self, stream_id: str) -> str:
        return f"{self.key_prefix}:{{{stream_id}}}"

    @_redis_errors_as_status
    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    @_redis_errors_as_status
    async def load(self, stream_ids: Sequence[str]) -> list[Loaded]:
        """Every slot of a batch, one round trip per node; None where a stream has no slot."""
        if not stream_ids:
            return []
        raw = await self._router.read([self.key(s) for s in stream_ids])
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
    async def save(self, writes: Sequence[SlotWrite]) -> list[bool | ServiceError]:
        """Compare-and-set every write of a batch, one round trip per node; True where it was applied,
        False where the version had moved, an error where it was applied but too few replicas confirmed."""
        if not writes:
            return []
        items = [
            (self.key(w.stream_id), (w.expected_version, w.record.encode() if w.record else b"", w.ttl_ms))
            for w in writes
        ]
        done = await self._router.run_script(_COMPARE_AND_SET, items)
        outcome: list[bool | ServiceError] = [bool(flag) for flag in done.results]
        for index, replicas in done.unconfirmed.items():
            if outcome[index]:
                outcome[index] = self._unconfirmed(replicas)
        return outcome

    @property
    def waits_for_replicas(self) -> bool:
        return self._router.wait.replicas > 0

    @_redis_errors_as_status
    async def confirm(self, stream_ids: Sequence[str]) -> list[ServiceError | None]:
        """Before a stored answer is replayed with WAIT on: None where replicas hold the stream's slot."""
        if not stream_ids or not self.waits_for_replicas:
            return [None] * len(stream_ids)
        done = await self._router.run_script(_TOUCH, [(self.key(s), ()) for s in stream_ids])
        return [self._unconfirmed(done.unconfirmed[i]) if i in done.unconfirmed else None
                for i in range(len(stream_ids))]

    def _unconfirmed(self, replicas: int | None) -> ServiceError:
        return replication_unconfirmed(replicas, self._router.wait.replicas, self._router.wait.timeout_ms)

    @_redis_errors_as_status
    async def delete(self, stream_id: str) -> bool:
        return bool(await self._redis.delete(self.key(stream_id)))

    @_redis_errors_as_status
    async def inspect(self, stream_id: str) -> tuple[Loaded, int]:
        """The slot and its remaining time to live in ms (-2 when missing, as PTTL says)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self.key(stream_id))
            pipe.pttl(self.key(stream_id))
            data, ttl = await pipe.execute()
        return self._decode(data), int(ttl)

    async def close(self) -> None:
        await self._redis.aclose()


def now_unix_ms() -> int:
    return time.time_ns() // 1_000_000
