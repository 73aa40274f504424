"""Health follows Redis: a load balancer should stop sending chunks to a replica that cannot save them.

The gRPC health service answers SERVING for every inference service while Redis answers a ping, and
NOT_SERVING while it does not; the metrics `lstm_serve_redis_up` and `lstm_serve_ready` say the same. While Redis
answers, the same check reads its used memory (`lstm_serve_redis_used_memory_bytes`, for soak runs).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from server import metrics
from server.state.store import StateStore

log = logging.getLogger("server")

HEALTH_POLL_S = 1.0


class RedisHealth:
    def __init__(self, store: StateStore, health: HealthServicer, services: Sequence[str]) -> None:
        self._store = store
        self._health = health
        self._services = ("", *services)  # "": the server as a whole
        self._up: bool | None = None  # the last answer, once there is one

    @property
    def up(self) -> bool:
        """Whether Redis answered the last ping (the HTTP port's /v2/health/ready reads it)."""
        return bool(self._up)

    async def check(self) -> None:
        """Ping Redis once; on a change, set every service's health and log it (not the first answer)."""
        started = time.perf_counter()
        try:
            up = await self._store.ping()
            metrics.REDIS_PING_SECONDS.observe(time.perf_counter() - started)
        except Exception:
            up = False
        metrics.REDIS_UP.set(1 if up else 0)
        metrics.READY.set(1 if up else 0)
        if self._up != up:
            await self._follow(up)
        if up:
            # After the health change: a slow INFO must not delay SERVING.
            await self._read_used_memory()

    async def _follow(self, up: bool) -> None:
        """Set every service's health to Redis' new state, and log it (not the first answer)."""
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._services:
            await self._health.set(name, status)
        if self._up is not None:
            log.warning("redis %s", "reachable again" if up else "unreachable")
        self._up = up

    async def _read_used_memory(self) -> None:
        """Redis' used memory for `lstm_serve_redis_used_memory_bytes`, at the tracker's cadence rather than on
        every scrape, so a scraper polling fast adds no Redis calls. Unanswered: the gauge keeps its last value."""
        try:
            used = await self._store.used_memory()
        except Exception:  # a gauge is never worth a health check
            log.debug("redis INFO memory failed", exc_info=True)
            return
        if used is None:
            log.debug("redis INFO memory not answered in time; lstm_serve_redis_used_memory_bytes unchanged")
            return
        metrics.REDIS_USED_MEMORY.set(used)

    async def track(self) -> None:
        """Check every HEALTH_POLL_S until cancelled."""
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            await self.check()
