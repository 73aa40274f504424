"""Health follows Redis: a load balancer should stop sending chunks to a replica that cannot save them.

The gRPC health service answers SERVING for every inference service while Redis answers a ping, and
NOT_SERVING while it does not; the metrics `lstm_serve_redis_up` and `lstm_serve_ready` say the same.
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
        if self._up == up:
            return
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._services:
            await self._health.set(name, status)
        if self._up is not None:
            log.warning("redis %s", "reachable again" if up else "unreachable")
        self._up = up

    async def track(self) -> None:
        """Check every HEALTH_POLL_S until cancelled."""
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            await self.check()
