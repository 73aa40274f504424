"""The Lua scripts of the state store (server/state/store.py), each one atomic step on the Redis server.

Each is sent by SHA and loaded on NOSCRIPT (server/state/routing.py), so its text crosses the network once
per node. Every Redis call inside is pcall'd where one key's failure must not stop the others.
"""

from __future__ import annotations

from server.state.record import FLAG_ENDED, FLAGS_OFFSET, MAGIC, VERSION_SIZE

# KEYS: slot keys. ARGV: for each key, (expected version, new record, version of the new record, ttl ms).
# Expected version "" means the key must not exist; a new record "" means delete the key (its version "").
# Per key: 1 written now; 2 already written (the version is in place: an earlier send of this same save
# got through); 0 refused (the key holds another version); "WRONGTYPE <type>" or "ERR <error>" when the key
# could not be read or written. Every Redis call is pcall'd, so one key's failure never stops the others.
SAVE = f"""
local results = {{}}
for i, key in ipairs(KEYS) do
  local expected, record, mine, ttl = ARGV[4 * i - 3], ARGV[4 * i - 2], ARGV[4 * i - 1], ARGV[4 * i]
  local current = redis.pcall('GETRANGE', key, 0, {VERSION_SIZE - 1})
  if type(current) == 'table' then
    results[i] = 'WRONGTYPE ' .. redis.call('TYPE', key)['ok']
  elseif current == expected then
    local done
    if record == '' then
      done = redis.pcall('DEL', key)
    else
      done = redis.pcall('SET', key, record, 'PX', ttl)
    end
    if type(done) == 'table' and done['err'] and string.sub(done['err'], 1, 8) == 'READONLY' then
      -- A replica (a master demoted by a failover): nothing can be written here. The error ends the
      -- script, and redis-py's Sentinel connection is then dropped and finds the master again.
      return redis.error_reply(done['err'])
    elseif type(done) == 'table' and done['err'] then
      results[i] = 'ERR ' .. done['err']
    else
      results[i] = 1
    end
  elseif current == mine then
    -- A replicated no-op (the same time to live again), so that a WAIT after this resend covers the
    -- earlier write, which was made on another connection.
    redis.call('PEXPIRE', key, ttl)  -- READONLY on a replica ends the script (as above)
    results[i] = 2
  else
    results[i] = 0
  end
end
return results
"""

# KEYS: slot keys. ARGV: for each key, the version an answer was decided on ("" when the key was absent).
# With --redis-wait-replicas an answer that ends in no save (a replayed retry, a refusal) is acknowledged
# only through this script and the WAIT after it, on one connection (server/dataplane/processor.py): per
# key 1 when the key still holds that version, 0 when it holds another (the answer was decided on a stale
# read: the chunk is decided again). Where it holds that version, a write that changes nothing but is
# replicated (the same time to live again, or the same value where it has none) makes the WAIT cover the
# record too. On an absent key it deletes nothing, which still counts as a write: a replica refuses
# (READONLY) every call here, so a connection to a master since demoted fails and is dropped, and a node
# with fewer replicas than WAIT asks for (an old master cut off by a failover) cannot confirm anything.
CONFIRM = f"""
local results = {{}}
for i, key in ipairs(KEYS) do
  local current = redis.pcall('GETRANGE', key, 0, {VERSION_SIZE - 1})
  if type(current) == 'table' or current ~= ARGV[i] then
    results[i] = 0
  else
    if current == '' then
      redis.call('DEL', key)
    else
      local ttl = redis.call('PTTL', key)
      if ttl > 0 then
        redis.call('PEXPIRE', key, ttl)
      else
        redis.call('SET', key, redis.call('GET', key), 'KEEPTTL')
      end
    end
    results[i] = 1
  end
end
return results
"""

# KEYS[1]: a stream's slot key. Deletes whatever the key holds (any Redis type) and says what it was:
# RESET_NONE nothing, RESET_LIVE a stream's state (or a value that is not an ended record), RESET_ENDED the
# record of an ended stream (kept only to answer retries of its last chunk: the stream no longer exists,
# as GetStream says).
RESET_NONE, RESET_LIVE, RESET_ENDED = 0, 1, 2
RESET = f"""
local head = redis.pcall('GETRANGE', KEYS[1], 0, {FLAGS_OFFSET})
if redis.call('DEL', KEYS[1]) == 0 then
  return {RESET_NONE}
end
if type(head) == 'string' and #head > {FLAGS_OFFSET}
    and string.sub(head, {VERSION_SIZE + 1}, {VERSION_SIZE + len(MAGIC)}) == '{MAGIC.decode()}'
    and bit.band(string.byte(head, {FLAGS_OFFSET + 1}), {FLAG_ENDED}) ~= 0 then
  return {RESET_ENDED}
end
return {RESET_LIVE}
"""
