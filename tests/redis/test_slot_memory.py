"""Slots kept in memory (--slot-memory-mb, server/state/cache.py): a stream's next chunk starts from the
record its server saved last instead of reading Redis, and nothing answers differently for it.

Two replicas share one Redis; a stream moves between them, so one replica's memory falls behind what
Redis holds. Such a stale slot may only be the base of a save (the compare-and-set refuses it and the
chunk runs again from Redis: invariants 4 and 5); an answer without a save (a replay, a refusal) is
decided on Redis' slot (invariants 9 and 10). Every output is checked against Keras on the whole
sequence (invariant 1), and the replica's metrics show which path each case took.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import numpy as np
import pytest

from devkit.metrics import scrape, value
from devkit.native_calls import outputs, predict, status_of
from devkit.processes import ServerProcess
from devkit.references import TOLERANCE, keras_whole_sequence
from lstm_stream.v1 import stream_pb2 as pb
from server.config import DEFAULT_MODEL, ServerConfig
from server.dataplane.processor import BatchProcessor, StreamPolicy
from server.dataplane.versions import ModelVersions
from server.errors import ServiceError
from server.model.identity import IdentityRunner
from server.state.cache import ENTRY_OVERHEAD_BYTES, SavedSlots
from server.state.live import LiveStreams
from server.state.store import StateStore
from server.types import CONFLICT, Chunk, ModelDescription, Prediction

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def replicas(default_server: ServerProcess, default_replica: ServerProcess) -> tuple[ServerProcess, ServerProcess]:
    """Two servers with the default flags on one Redis: the session's shared pair (every test here reads
    counter changes around its own calls and uses its own streams, so earlier traffic does not matter)."""
    return default_server, default_replica


def sequence(length: int, seed: int) -> tuple[str, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(length, 1)).astype(np.float32)
    return f"mem-{uuid.uuid4().hex[:8]}", x


def counters(server: ServerProcess) -> dict[str, float]:
    samples = scrape(server)
    return {
        "memory": value(samples, "lstm_serve_slot_loads_total", source="memory"),
        "redis": value(samples, "lstm_serve_slot_loads_total", source="redis"),
        "reread": value(samples, "lstm_serve_slot_memory_rereads_total"),
        "refused": value(samples, "lstm_serve_slot_memory_refused_total"),
        "conflicts": value(samples, "lstm_serve_conflicts_total"),
    }


def change(before: dict[str, float], server: ServerProcess) -> dict[str, float]:
    after = counters(server)
    return {name: after[name] - before[name] for name in after}


def assert_exact(got: list[np.ndarray], x: np.ndarray) -> None:
    diff = np.max(np.abs(np.concatenate(got) - keras_whole_sequence(DEFAULT_MODEL, x)))
    assert diff <= TOLERANCE, diff


def test_a_stream_on_one_server_continues_from_memory(replicas) -> None:
    a, _ = replicas
    stream, x = sequence(50, seed=1)
    before = counters(a)
    got = [outputs(predict(a.stub, stream, x[start:start + 10], start_offset=start)) for start in range(0, 50, 10)]
    assert_exact(got, x)
    moved = change(before, a)
    # The first chunk reads Redis (nothing saved yet); the next four start from what the server saved.
    assert moved["memory"] == 4 and moved["redis"] == 1, moved
    assert moved["reread"] == moved["refused"] == 0, moved


def test_a_chunk_at_the_offset_redis_holds_is_served_though_memory_is_behind(replicas) -> None:
    a, b = replicas
    stream, x = sequence(30, seed=2)
    got = [outputs(predict(a.stub, stream, x[:10], start_offset=0)),
           outputs(predict(b.stub, stream, x[10:20], start_offset=10))]
    before = counters(a)
    # a's memory says offset 10, which would refuse start_offset 20: the refusal is checked on Redis.
    got.append(outputs(predict(a.stub, stream, x[20:], start_offset=20)))
    assert_exact(got, x)
    moved = change(before, a)
    assert moved["reread"] == 1 and moved["memory"] == 0, moved


def test_an_appended_chunk_on_stale_memory_runs_again_from_redis(replicas) -> None:
    a, b = replicas
    stream, x = sequence(30, seed=3)
    got = [outputs(predict(a.stub, stream, x[:10], reset=True)), outputs(predict(b.stub, stream, x[10:20]))]
    before = counters(a)
    # No offset to check: a would continue its stale slot (offset 10); the compare-and-set refuses that save.
    reply = predict(a.stub, stream, x[20:])
    got.append(outputs(reply))
    assert reply.offset == 30
    assert_exact(got, x)
    moved = change(before, a)
    assert moved["refused"] == 1 and moved["conflicts"] == 1, moved
    # The stream is now known to be written elsewhere too: a keeps no record of it for a while, so its
    # next chunks read Redis instead of running twice.
    before = counters(a)
    reply = predict(a.stub, stream, x[:5])
    assert reply.offset == 35
    moved = change(before, a)
    assert moved["redis"] == 1 and moved["memory"] == 0 and moved["conflicts"] == 0, moved


def test_a_roaming_stream_is_kept_in_memory_again_after_the_roaming_time(replicas, redis_server) -> None:
    """--slot-memory-roaming-s reaches the store: after it, a stream that stopped hopping starts from memory
    again (with the default, five minutes, its chunks would still read Redis here)."""
    _, b = replicas
    roaming_s = 2.0
    a = ServerProcess(redis_server.url, DEFAULT_MODEL, "--slot-memory-roaming-s", str(roaming_s))
    try:
        stream, x = sequence(60, seed=8)
        got = [outputs(predict(a.stub, stream, x[:10], reset=True)), outputs(predict(b.stub, stream, x[10:20]))]
        got.append(outputs(predict(a.stub, stream, x[20:30])))  # a's save is refused: the stream roams
        marked = time.monotonic()
        before = counters(a)
        got.append(outputs(predict(a.stub, stream, x[30:40])))
        assert change(before, a)["redis"] == 1, "a roaming stream's chunk reads Redis"
        time.sleep(max(0.0, marked + roaming_s + 0.2 - time.monotonic()))
        before = counters(a)
        got.append(outputs(predict(a.stub, stream, x[40:50])))  # the mark lapsed: this save is kept again
        got.append(outputs(predict(a.stub, stream, x[50:])))
        moved = change(before, a)
        assert moved["redis"] == 1 and moved["memory"] == 1 and moved["conflicts"] == 0, moved
        assert_exact(got, x)
    finally:
        a.stop()


def test_a_late_retry_is_refused_not_replayed_from_stale_memory(replicas) -> None:
    a, b = replicas
    window = ServerConfig().replay_window
    stream, x = sequence(2 * (window + 1), seed=4)
    predict(a.stub, stream, x[:2], start_offset=0)
    for n in range(2, len(x), 2):  # b moves the stream on until the first chunk's answer is no longer kept
        predict(b.stub, stream, x[n:n + 2], start_offset=n)
    # In a's memory the first chunk is still the last one applied, so it looks like a retry to replay.
    code, message, _ = status_of(predict, a.stub, stream, x[:2], start_offset=0)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and f"at offset {len(x)}" in message, (code, message)
    assert "no longer kept" in message
    # Append mode, where a retry is recognised by its request id: a's stale memory would replay r2.
    stream, x = sequence(20, seed=5)
    predict(a.stub, stream, x[:10], reset=True, request_id="r1")
    predict(a.stub, stream, x[10:], request_id="r2")
    predict(b.stub, stream, x[:5], reset=True, request_id="r3")  # b restarts the stream
    # In a's memory r2 is the last chunk (a replay of its old answer); on Redis' slot it is not the last
    # chunk nor one of the new sequence's: it continues b's sequence.
    reply = predict(a.stub, stream, x[10:], request_id="r2")
    assert not reply.replayed and reply.offset == 15


def test_a_reset_on_another_replica_is_not_undone_by_memory(replicas) -> None:
    a, b = replicas
    stream, x = sequence(20, seed=6)
    predict(a.stub, stream, x[:10], reset=True)
    assert b.stub.ResetStream(pb.ResetStreamRequest(stream_id=stream)).existed
    reply = predict(a.stub, stream, x[10:])
    assert reply.offset == 10  # a fresh sequence, not a's remembered one
    assert_exact([outputs(reply)], x[10:])


def test_a_limited_tenants_chunk_never_starts_from_memory(redis_server) -> None:
    """A tenant's live-stream count (invariant 12) is updated from the slot a chunk starts from, before any
    save could notice it was stale: a stream reset elsewhere, continued on a replica that remembers it,
    would be counted as still live and pass the limit. So those chunks always read Redis."""

    async def scenario() -> None:
        prefix = f"m{uuid.uuid4().hex[:6]}"
        description = ModelDescription("m", "ab" * 8, input_features=1, output_size=1, per_timestep_outputs=True,
                                       state_size=4)
        policy = StreamPolicy.from_config(ServerConfig())
        replicas = []
        for _ in range(2):
            store = StateStore(redis_server.url, key_prefix=prefix,
                               saved_slots=SavedSlots(1 << 20, ServerConfig().slot_memory_roaming_s))
            live = LiveStreams(store, policy.state_ttl_ms, limit_of=lambda tenant: 1)
            processor = BatchProcessor(ModelVersions.of(IdentityRunner(description, 64)), store, policy, live)
            replicas.append((processor, store, live))
        (a, a_store, _), (b, b_store, b_live) = replicas

        async def answer(processor: BatchProcessor, stream: str, **fields: object) -> object:
            for _ in range(6):  # as the batcher does: a chunk whose save was refused runs again
                (result,) = await processor([Chunk(stream, np.ones((2, 1), np.float32), tenant="small", **fields)])
                if result is not CONFLICT:
                    return result
            raise AssertionError("still conflicting")

        try:
            assert isinstance(await answer(a, "s1", reset=True), Prediction)
            deadline = time.monotonic() + 10
            assert await b_store.delete("s1", deadline, "small")  # ResetStream on b
            await b_live.forget("small", "s1", deadline)
            assert isinstance(await answer(b, "s2", reset=True), Prediction)  # the tenant's one live stream
            refused = await answer(a, "s1")  # a still holds s1's last record in memory
            assert isinstance(refused, ServiceError) and refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
            assert await a_store.client.zcard(f"{prefix}:small:live") == 1
            assert a_store.saved_slots is not None and len(a_store.saved_slots) == 1  # s1's record was kept
        finally:
            for processor, store, _ in replicas:
                processor.close()
                await store.close()

    asyncio.run(scenario())


def test_memory_is_bounded_by_bytes_and_by_the_keys_time_to_live() -> None:
    def size(key: str, record: bytes = b"") -> int:  # what an entry counts for: key, record, the rest
        return ENTRY_OVERHEAD_BYTES + len(key) + len(record)

    entry = size("k0", bytes(100))
    memory = SavedSlots(max_bytes=3 * entry + 200, roaming_s=60)  # three such entries, and room for a small one
    for n in range(5):
        memory.put(f"k{n}", bytes([n]) * 100, ttl_ms=60_000)
    assert len(memory) == 3 and memory.bytes == 3 * entry  # least recently used first: k0 and k1 went
    assert memory.get("k0") is None and memory.get("k2") == bytes([2]) * 100
    memory.put("k5", b"x" * 100, ttl_ms=60_000)  # k2 was just used: k3 goes
    assert memory.get("k3") is None and memory.get("k2") is not None
    memory.put("k2", b"y" * 50, ttl_ms=60_000)  # replaced, counted once
    assert memory.bytes == 2 * entry + size("k2", b"y" * 50) and memory.get("k2") == b"y" * 50
    held = memory.bytes
    memory.put("big", b"z" * memory.max_bytes, ttl_ms=60_000)  # larger than the budget: not kept, nothing evicted
    assert memory.get("big") is None and memory.bytes == held
    memory.put("short", b"s", ttl_ms=1)
    time.sleep(0.01)
    assert memory.get("short") is None and memory.bytes == held  # the key would have expired in Redis
    memory.drop("k2")
    assert memory.bytes == 2 * entry and len(memory) == 2
    # A key another writer changed (a refused save) is marked roaming: no record is kept for it meanwhile.
    memory.roam("k4")
    assert memory.get("k4") is None and memory.bytes == entry + size("k4")
    memory.put("k4", b"w" * 100, ttl_ms=60_000)
    assert memory.get("k4") is None and memory.bytes == entry + size("k4")
    memory.drop("k4")  # ResetStream on this process forgets the mark too
    memory.put("k4", b"w" * 100, ttl_ms=60_000)
    assert memory.get("k4") == b"w" * 100


def test_a_roaming_mark_lapses_after_roaming_s() -> None:
    # Half a second: a pause of the test process between roam and put must not let the mark lapse first.
    memory = SavedSlots(max_bytes=1 << 20, roaming_s=0.5)
    memory.roam("k")
    memory.put("k", b"r" * 10, ttl_ms=60_000)
    assert memory.get("k") is None  # roaming: not kept
    time.sleep(0.55)
    memory.put("k", b"r" * 10, ttl_ms=60_000)
    assert memory.get("k") == b"r" * 10
