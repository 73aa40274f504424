"""What each tenant may use (invariants 12 and 13, docs/invariants.md): its limits, and its chunk rate here.

The limits come from the key file or the server-wide defaults (server/security/tenants.py); the live
stream count is kept in Redis (server/state/live.py), the chunk rate in this process (`ChunkRate`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TenantLimits:
    max_streams: int = 0  # live streams at once; 0: no limit
    chunks_per_s: float = 0.0  # per replica (per worker process); 0: no limit


NO_LIMITS = TenantLimits()


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class ChunkRate:
    """A token bucket per tenant, in this process: `chunks_per_s` tokens a second and one second's worth
    (at least one chunk) of burst. Each replica and each worker process keeps its own buckets, so the
    rate a tenant gets from a deployment is the limit times the number of processes serving it."""

    def __init__(self, limits_of: Callable[[str], TenantLimits], clock: Callable[[], float] = time.monotonic) -> None:
        self._limits_of = limits_of
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def limit(self, tenant: str) -> float:
        return self._limits_of(tenant).chunks_per_s

    def allow(self, tenant: str) -> bool:
        rate = self.limit(tenant)
        if rate <= 0:
            return True
        capacity = max(rate, 1.0)
        now = self._clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = _Bucket(capacity, now)
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True
