"""Which record format the replicas write: the newest that every replica serving beside them can read.

During a rolling upgrade replicas of two releases serve the same streams, and a chunk may reach either.
A record written in a format the older release cannot read would break every stream it touches there
(0.1.0, which knows nothing of newer formats, answers DATA_LOSS). So one Redis key per deployment,
`<prefix>:record-format`, says the newest format any replica may write, and every replica reads it at
start-up and every REFRESH_S:

- absent, and no key of this prefix in Redis: a new deployment; the first replica sets it to the newest
  format it writes (SET NX: replicas starting together agree);
- absent, with keys of this prefix: a deployment upgraded from 0.1.0 (which knew nothing of this key);
  replicas write the format 0.1.0 reads (record.PREVIOUS_RELEASE_FORMAT: answers of the last chunk
  only), until the operator, once every replica runs this release, runs
  `lstm-serve admin record-format 4` (server/app/admin.py);
- present: that format (at most the newest this release writes). Lowering it again before a rollback
  makes replicas write the older format from their next refresh; records already written in the newer
  one stay until their streams' next chunk (docs/deploy.md, "Rolling upgrades").

Why an operator's step rather than replicas announcing what they read: the release being replaced
announces nothing, and a key written by the operator once the rollout is finished is the one moment
that is known to be safe. A later release that reads a newer format can announce itself in the same key.
Records in formats newer than a replica reads are answered UNAVAILABLE, not DATA_LOSS (server/errors.py,
slot_from_newer_release), so from this release on a rollback never loses a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis import exceptions as redis_errors

from server.state.connection import AsyncClient
from server.state.record import (
    EARLIER_ANSWERS_FORMAT,
    HISTORY_FORMAT,
    NEWEST_FORMAT,
    PREVIOUS_RELEASE_FORMAT,
    READ_FORMATS,
)

log = logging.getLogger("server")

FORMAT_KEY = "record-format"
# How often a replica reads the key again: a raised (or lowered) format reaches every replica this soon.
REFRESH_S = 5.0
# The longest the start-up look for existing keys may take; past it the deployment is taken as upgraded.
SCAN_BUDGET_S = 5.0
WRITABLE_FORMATS = tuple(f for f in READ_FORMATS if f >= PREVIOUS_RELEASE_FORMAT)
REDIS_ERRORS = (redis_errors.RedisError, OSError, asyncio.TimeoutError)


class FormatKeyError(ValueError):
    """The key holds something that is not a format this release writes."""


def parse_format(value: bytes | str | None) -> int | None:
    if value is None:
        return None
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    try:
        found = int(text)
    except ValueError as exc:
        raise FormatKeyError(f"the record-format key holds {text[:20]!r}, not a format number") from exc
    return found


class RecordFormat:
    """The format this replica writes now (`writes`), kept in step with the deployment's key."""

    def __init__(self, client: AsyncClient, key_prefix: str) -> None:
        self.key = f"{key_prefix}:{FORMAT_KEY}"
        self._prefix = key_prefix
        self._client = client
        # Until Redis says otherwise: what every release this one may serve beside reads.
        self.writes = PREVIOUS_RELEASE_FORMAT
        self._settled = False

    @property
    def keeps_earlier_answers(self) -> bool:
        """Whether records may carry the answers of chunks before the last one (format 3 and later)."""
        return self.writes >= EARLIER_ANSWERS_FORMAT

    @property
    def keeps_history(self) -> bool:
        """Whether records may carry the stream's recent inputs (format 4, --history-timesteps)."""
        return self.writes >= HISTORY_FORMAT

    async def settle(self) -> None:
        """Decide the format (above). Redis unreachable: the previous release's, and settled on a later refresh."""
        try:
            found = parse_format(await self._client.get(self.key))
            if found is None and not await self._keys_exist():
                await self._client.set(self.key, NEWEST_FORMAT, nx=True)
                found = parse_format(await self._client.get(self.key))
                log.info("record format set for a new deployment", extra={"format": found, "key": self.key})
            elif found is None:
                log.warning(
                    "slot records of an earlier release exist and no record format is set: writing format %d "
                    "(the answer of each stream's last chunk only, which 0.1.0 reads) until every replica runs "
                    "this release and `lstm-serve admin record-format %d` allows the newest",
                    PREVIOUS_RELEASE_FORMAT, NEWEST_FORMAT, extra={"key": self.key},
                )
            self._settled = True
        except REDIS_ERRORS:
            return
        except FormatKeyError as exc:
            log.error("%s; writing format %d", exc, PREVIOUS_RELEASE_FORMAT)
            self._settled = True
            return
        self._use(found)

    async def refresh(self) -> None:
        if not self._settled:
            await self.settle()
            return
        try:
            found = parse_format(await self._client.get(self.key))
        except REDIS_ERRORS:
            return  # the health check says Redis is down; keep writing what was allowed
        except FormatKeyError as exc:
            log.error("%s; keeping format %d", exc, self.writes)
            return
        self._use(found)

    async def track(self) -> None:
        """Refresh every REFRESH_S until cancelled."""
        while True:
            await asyncio.sleep(REFRESH_S)
            await self.refresh()

    def _use(self, found: int | None) -> None:
        if found is None:
            return
        wanted = max((f for f in WRITABLE_FORMATS if f <= found), default=PREVIOUS_RELEASE_FORMAT)
        if wanted != self.writes:
            log.warning("writing record format %d", wanted, extra={"was": self.writes, "allowed": found})
            self.writes = wanted

    async def _keys_exist(self) -> bool:
        """Whether any key of this prefix but the format key exists (on every node of a cluster)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SCAN_BUDGET_S):
                async for key in self._client.scan_iter(match=f"{self._prefix}:*", count=1000):
                    if (key.decode(errors="replace") if isinstance(key, bytes) else key) != self.key:
                        return True
                return False
        return True  # too many other keys to look through in time: assume an earlier deployment
