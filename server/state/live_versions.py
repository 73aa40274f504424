"""Live streams per model version, for the metric `lstm_serve_live_streams{model,version}` (docs/models.md).

Which version a stream is pinned to is in its record, one key per stream; counting them would mean a scan of
Redis. Instead each model has one sorted set per version, `<prefix>:@<model>:live:{@<model>}:<v>`, holding
the streams (`<tenant>/<stream id>`) whose last chunk ran on that version, scored by when it ran, and an
index set `<prefix>:@<model>:live:{@<model>}` of the versions that have one (keys.py). A stream is live from
its first chunk until a chunk ends it, ResetStream forgets it, or it is idle for the state TTL, when its state
expires too: members older than that are not counted, and are pruned whenever notes are written. All of a
model's sets share one hash tag, so one script updates and counts them atomically on a Redis Cluster as well.

This is an account for operators, not a rule a chunk depends on, so it is kept off the chunk's path: each
process notes the streams its batches saved in memory (the newest note per stream) and writes them every
--live-streams-interval-s in one script call per model (a few thousand members a call), which also prunes
and counts every version; with nothing to write it only reads the counts (ZCOUNT, no script). A note older
than what Redis holds (another replica wrote since) changes nothing, so replicas that write out of order
agree; every replica reports the same deployment-wide counts. While Redis is unreachable the notes wait (one
per stream at most) and the gauges keep their last value.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.state.keys import KeyLayout
from server.state.store import StateStore, now_unix_ms

# Members sent per script call: one call blocks Redis for about a millisecond per thousand.
NOTES_PER_CALL = 2000

# KEYS[1]: the index; KEYS[2..]: one sorted set per version. ARGV: now ms, prune-below ms, ttl ms, then the
# versions (as many as sorted sets), then (member, position, ms) triples: position i means "ran on the i-th
# version at ms", 0 "ended or forgotten at ms". Returns each version's count.
_UPDATE = """
local versions = #KEYS - 1
local first_note = 4 + versions
for i = first_note, #ARGV, 3 do
  local member, position, at = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local newer = false
  for v = 1, versions do
    local score = redis.call('ZSCORE', KEYS[v + 1], member)
    if score and tonumber(score) > at then
      newer = true
    end
  end
  if not newer then
    for v = 1, versions do
      if v ~= position then
        redis.call('ZREM', KEYS[v + 1], member)
      end
    end
    if position > 0 then
      redis.call('ZADD', KEYS[position + 1], at, member)
    end
  end
end
local counts = {}
for v = 1, versions do
  local key = KEYS[v + 1]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. ARGV[2])
  local count = redis.call('ZCARD', key)
  if count > 0 then
    redis.call('PEXPIRE', key, ARGV[3])
    redis.call('SADD', KEYS[1], ARGV[3 + v])
  else
    redis.call('SREM', KEYS[1], ARGV[3 + v])
  end
  counts[v] = count
end
if redis.call('SCARD', KEYS[1]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return counts
"""

ENDED = 0  # a note's version for a stream that is no longer live


@dataclass(frozen=True, slots=True)
class _Note:
    version: int  # ENDED: no longer live
    at_ms: int


class LiveStreamsByVersion:
    """One model's account of its live streams per version (see the module's docstring)."""

    def __init__(self, store: StateStore, model: str, state_ttl_ms: int) -> None:
        self._store = store
        self._redis = store.client
        keys = KeyLayout(store.keys.prefix)
        self._index = keys.live_versions(model)
        self._set_of = lambda version: keys.live_version(model, version)
        self._state_ttl_ms = state_ttl_ms
        self._notes: dict[str, _Note] = {}
        self._update = self._redis.register_script(_UPDATE)

    @staticmethod
    def member(stream_id: str, tenant: str = "") -> str:
        return f"{tenant}/{stream_id}"  # a tenant name has no "/"

    def ran(self, stream_id: str, tenant: str, version: int, at_ms: int) -> None:
        """A saved chunk of the stream ran on `version` (a chunk that ends its stream: `ended` instead)."""
        self._notes[self.member(stream_id, tenant)] = _Note(version, at_ms)

    def ended(self, stream_id: str, tenant: str, at_ms: int) -> None:
        self._notes[self.member(stream_id, tenant)] = _Note(ENDED, at_ms)

    async def count(self, versions: set[int], deadline: float) -> dict[int, int]:
        """Write the notes, prune, and count each version that has live streams or is in `versions` (the ones
        this process serves); raises what the store raises when Redis does not answer by `deadline`, and then
        keeps the notes for the next call."""
        notes, self._notes = self._notes, {}
        try:
            found = await self._store.run(lambda: self._redis.smembers(self._index), deadline)
            known = sorted(versions | {n.version for n in notes.values() if n.version != ENDED}
                           | {int(v) for v in found})
            position = {version: i + 1 for i, version in enumerate(known)}
            keys = [self._index, *(self._set_of(v) for v in known)]
            now = now_unix_ms()
            head: list[str | int] = [now, now - self._state_ttl_ms, self._state_ttl_ms, *known]
            items = list(notes.items())
            if not items:  # nothing to write: count without the script (reads only; idle members excluded)
                return dict(zip(known, await self._count_only(keys[1:], now - self._state_ttl_ms, deadline),
                                strict=True))
            counts: list[int] = [0] * len(known)
            for start in range(0, len(items), NOTES_PER_CALL):
                args = list(head)
                for member, note in items[start:start + NOTES_PER_CALL]:
                    args += [member, position.get(note.version, 0), note.at_ms]
                # Idempotent: a resent call finds the notes already written and counts the same.
                counts = await self._store.run(lambda args=args: self._update(keys=keys, args=args), deadline)
        except BaseException:
            for member, note in notes.items():  # newer notes taken meanwhile win
                self._notes.setdefault(member, note)
            raise
        return dict(zip(known, (int(c) for c in counts), strict=True))

    async def _count_only(self, sets: list[str], live_since_ms: int, deadline: float) -> list[int]:
        async def counts() -> list[int]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in sets:
                    pipe.zcount(key, live_since_ms, "+inf")
                return await pipe.execute()

        return [int(c) for c in await self._store.run(counts, deadline)] if sets else []
