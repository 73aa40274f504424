"""Live streams per model version (server/state/live_versions.py, the metric lstm_serve_live_streams), counted
in a real Redis by two accounts standing in for two replicas that write their notes out of order."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from devkit.processes import RedisServer
from server.errors import ServiceError
from server.state.live_versions import LiveStreamsByVersion
from server.state.store import StateStore, now_unix_ms

pytestmark = pytest.mark.timeout(60)


def soon(seconds: float = 5) -> float:
    return time.monotonic() + seconds


def test_replicas_writing_out_of_order_agree_on_each_versions_count(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        prefix = f"lv-{uuid.uuid4().hex[:8]}"
        store_a, store_b = StateStore(redis_server.url, prefix), StateStore(redis_server.url, prefix)
        replica_a = LiveStreamsByVersion(store_a, "m", state_ttl_ms=60_000)
        replica_b = LiveStreamsByVersion(store_b, "m", state_ttl_ms=60_000)
        try:
            t = now_unix_ms()
            replica_a.ran("s1", "", 1, t)
            replica_a.ran("s2", "", 1, t)
            replica_a.ran("s2", "acme", 1, t)  # another tenant's stream of the same id: another stream
            assert await replica_a.count({1}, soon()) == {1: 3}
            # s1 moved to v2 on replica B; replica A's older note of s1 on v1 arrives after it and changes nothing.
            replica_b.ran("s1", "", 2, t + 10)
            assert await replica_b.count({2}, soon()) == {1: 2, 2: 1}
            replica_a.ran("s1", "", 1, t + 5)
            assert await replica_a.count({1}, soon()) == {1: 2, 2: 1}
            # An end, and a reset (both "ended"): no longer live; a version with none left leaves the index.
            replica_b.ended("s2", "", t + 20)
            replica_b.ended("s2", "acme", t + 20)
            assert await replica_b.count({2}, soon()) == {1: 0, 2: 1}
            assert await replica_b.count({2}, soon()) == {2: 1}
            # The newest note of a stream in one process wins over that process's earlier one.
            replica_a.ran("s3", "", 2, t + 30)
            replica_a.ended("s3", "", t + 31)
            assert await replica_a.count(set(), soon()) == {2: 1}
        finally:
            await store_a.close()
            await store_b.close()

    asyncio.run(scenario())


def test_idle_streams_stop_counting_after_the_state_ttl(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = StateStore(redis_server.url, f"lv-{uuid.uuid4().hex[:8]}")
        account = LiveStreamsByVersion(store, "m", state_ttl_ms=300)
        try:
            account.ran("idle", "", 1, now_unix_ms())
            assert await account.count(set(), soon()) == {1: 1}
            await asyncio.sleep(0.5)
            assert await account.count({1}, soon()) == {1: 0}  # nothing written since: counted by reads alone
            account.ran("busy", "", 1, now_unix_ms())
            assert await account.count(set(), soon()) == {1: 1}
        finally:
            await store.close()

    asyncio.run(scenario())


def test_notes_wait_while_redis_is_unreachable_and_are_written_when_it_answers() -> None:
    redis_server = RedisServer()

    async def scenario() -> None:
        store = StateStore(redis_server.url, "lv")
        account = LiveStreamsByVersion(store, "m", state_ttl_ms=60_000)
        try:
            account.ran("s1", "", 1, now_unix_ms())
            redis_server.stop()
            with pytest.raises(ServiceError):
                await account.count({1}, soon(0.5))
            redis_server.start()
            assert await account.count({1}, soon()) == {1: 1}
        finally:
            await store.close()

    try:
        asyncio.run(scenario())
    finally:
        redis_server.stop()
