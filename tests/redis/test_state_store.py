"""The Redis state store on its own: record format, batch load, compare-and-set, expiry, bad records."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import numpy as np
import pytest

from devkit.native_calls import predict, request, status_of
from server.state.record import SlotRecord, new_version
from server.state.store import APPLIED, REFUSED, SlotWrite, StateStore

pytestmark = pytest.mark.timeout(60)


def soon() -> float:
    return time.monotonic() + 5


def record(offset: int, state_size: int = 256) -> SlotRecord:
    return SlotRecord(
        version=new_version(), offset=offset, updated_unix_ms=1, fingerprint=b"abcdefgh", last_start=0,
        last_digest=bytes(16), last_request_id=bytes(8), state=np.arange(state_size, dtype=np.float32),
        last_outputs=np.ones((20, 1), np.float32),
    )


def test_record_round_trip_and_size() -> None:
    original = record(42)
    data = original.encode()
    # No earlier answers kept: format 2, which the previous release reads too (108-byte header).
    assert data[10] == 2 and len(data) == 108 + 4 * (256 + 20)
    decoded = SlotRecord.decode(data)
    assert decoded.offset == 42 and decoded.version == original.version
    np.testing.assert_array_equal(decoded.state, original.state)
    np.testing.assert_array_equal(decoded.last_outputs, original.last_outputs)


def test_compare_and_set_lets_exactly_one_writer_win(redis_server) -> None:
    async def scenario() -> None:
        store = StateStore(redis_server.url, key_prefix=f"t{uuid.uuid4().hex[:6]}")
        first = record(1)
        assert await store.save([SlotWrite("s", b"", first, 60_000)], soon()) == [APPLIED]
        # Two writers that both loaded `first` race; one compare-and-set wins, the other is refused.
        results = await asyncio.gather(
            store.save([SlotWrite("s", first.version, record(2), 60_000)], soon()),
            store.save([SlotWrite("s", first.version, record(3), 60_000)], soon()),
        )
        assert sorted(r[0] is APPLIED for r in results) == [False, True]
        (loaded,) = await store.load(["s"], soon())
        assert loaded.offset in (2, 3)
        # Creating over an existing slot, or deleting with a stale version, is refused too.
        assert await store.save([SlotWrite("s", b"", record(9), 60_000)], soon()) == [REFUSED]
        assert await store.save([SlotWrite("s", first.version, None, 60_000)], soon()) == [REFUSED]
        assert await store.save([SlotWrite("s", loaded.version, None, 60_000)], soon()) == [APPLIED]
        assert await store.load(["s", "missing"], soon()) == [None, None]
        await store.close()

    asyncio.run(scenario())


def test_one_batch_saves_independently_per_stream(redis_server) -> None:
    async def scenario() -> None:
        store = StateStore(redis_server.url, key_prefix=f"t{uuid.uuid4().hex[:6]}")
        await store.save([SlotWrite("a", b"", record(1), 60_000)], soon())
        applied = await store.save([
            SlotWrite("a", b"stale!!!", record(5), 60_000),
            SlotWrite("b", b"", record(7), 60_000),
        ], soon())
        assert applied == [REFUSED, APPLIED]
        a, b = await store.load(["a", "b"], soon())
        assert (a.offset, b.offset) == (1, 7)
        _, ttl = await store.inspect("b", soon())
        assert 0 < ttl <= 60_000
        await store.close()

    asyncio.run(scenario())


def test_an_unreadable_slot_is_data_loss_until_reset(default_server, redis_server) -> None:
    stream = f"corrupt-{uuid.uuid4().hex[:8]}"
    redis_server.client().set(f"lstm:{{{stream}}}", b"not a record")
    x = np.zeros((3, 1), np.float32)
    code, message, _ = status_of(default_server.stub.Predict, request(stream, x))
    assert code == grpc.StatusCode.DATA_LOSS and "reset" in message
    assert predict(default_server.stub, stream, x, reset=True).offset == 3


def test_used_memory_is_redis_info_memory_or_none_when_unanswered(redis_server) -> None:
    # What lstm_serve_redis_used_memory_bytes shows: None (the gauge left as it was) when Redis does not answer.
    async def used(url: str) -> int | None:
        store = StateStore(url, "lstm")
        try:
            return await store.used_memory()
        finally:
            await store.close()

    reported = asyncio.run(used(redis_server.url))
    direct = redis_server.client().info("memory")["used_memory"]
    assert reported is not None and 0.8 * direct < reported < 1.2 * direct, (reported, direct)
    assert asyncio.run(used("redis://127.0.0.1:1/0")) is None


def test_format_1_records_still_decode() -> None:
    # A record as the first release wrote it: an upgraded server keeps every stream (docs/invariants.md, 10).
    import struct

    state, outputs = np.arange(4, dtype="<f4"), np.ones((2, 1), "<f4")
    header = struct.pack("<8s2sBBQq8sQ16s8sIII", b"v" * 8, b"LS", 1, 0, 7, 1, b"abcdefgh", 5, b"d" * 16,
                         bytes(8), 4, 2, 1)
    decoded = SlotRecord.decode(header + state.tobytes() + outputs.tobytes())
    assert (decoded.version, decoded.offset, decoded.last_start, decoded.last_digest) == (b"v" * 8, 7, 5, b"d" * 16)
    assert decoded.first_digest == bytes(16) and decoded.recent_requests == b""
    np.testing.assert_array_equal(decoded.state, state)
    again = SlotRecord.decode(decoded.encode())  # written back as format 2
    assert again.offset == 7 and again.encode()[10] == 2


def test_a_key_of_another_type_fails_its_stream_alone(redis_server) -> None:
    # Invariant 9 and issue 8 item 2: one key that cannot be written never half-writes a batch.
    async def scenario() -> None:
        prefix = f"t{uuid.uuid4().hex[:6]}"
        store = StateStore(redis_server.url, key_prefix=prefix)
        client = redis_server.client()
        client.hset(store.key("h"), "field", "value")
        client.rpush(store.key("l"), "item")
        loaded = await store.load(["a", "h", "l", "z"], soon())
        assert loaded[0] is None and loaded[3] is None
        assert (loaded[1].redis_type, loaded[2].redis_type) == ("hash", "list")
        results = await store.save([SlotWrite(s, b"", record(n), 60_000) for n, s in enumerate("ahlz")], soon())
        assert results[0] is APPLIED and results[3] is APPLIED
        for result, kind in zip(results[1:3], ("hash", "list"), strict=True):
            assert result.code == grpc.StatusCode.FAILED_PRECONDITION and f"holds a {kind}" in result.message
        a, _, _, z = await store.load(["a", "h", "l", "z"], soon())
        assert (a.offset, z.offset) == (0, 3)
        assert client.type(store.key("h")) == b"hash" and client.hget(store.key("h"), "field") == b"value"
        await store.close()

    asyncio.run(scenario())


def test_a_save_sent_twice_applies_once_and_a_late_copy_changes_nothing(redis_server) -> None:
    # What the store does when a save's answer is lost: it sends the same save again. The record's own
    # version in place means "already applied"; a copy that arrives after a newer write is refused.
    async def scenario() -> None:
        store = StateStore(redis_server.url, key_prefix=f"t{uuid.uuid4().hex[:6]}")
        first, second = record(1), record(2)
        write = SlotWrite("s", b"", first, 60_000)
        assert await store.save([write], soon()) == [APPLIED]
        assert await store.save([write], soon()) == [APPLIED]  # the resend: applied, not twice
        assert await store.save([SlotWrite("s", first.version, second, 60_000)], soon()) == [APPLIED]
        assert await store.save([write], soon()) == [REFUSED]  # the late copy of the first save
        (loaded,) = await store.load(["s"], soon())
        assert loaded.version == second.version
        await store.close()

    asyncio.run(scenario())


def test_no_answer_from_redis_within_the_deadline() -> None:
    # A stopped Redis: reads give up at the deadline as "not applied", a save as "outcome unknown".
    import signal

    from devkit.processes import RedisServer

    own = RedisServer(appendonly=False)

    async def scenario() -> None:
        store = StateStore(own.url, key_prefix="t")
        assert await store.save([SlotWrite("s", b"", record(1), 60_000)], soon()) == [APPLIED]
        own.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(Exception) as raised:
                await store.load(["s"], time.monotonic() + 0.5)
            assert raised.value.code == grpc.StatusCode.UNAVAILABLE and "not applied" in raised.value.message
            (result,) = await store.save([SlotWrite("s", b"x" * 8, record(2), 60_000)], time.monotonic() + 0.5)
            assert result.code == grpc.StatusCode.UNAVAILABLE and "outcome is unknown" in result.message
            assert dict(result.trailing_metadata())["x-chunk-outcome"] == "unknown"
            assert time.monotonic() - started < 3
        finally:
            own.process.send_signal(signal.SIGCONT)
        await store.close()

    try:
        asyncio.run(scenario())
    finally:
        own.stop()


def test_a_redis_out_of_memory_is_unavailable_not_applied() -> None:
    from devkit.processes import RedisServer

    own = RedisServer(appendonly=False)

    async def scenario() -> None:
        store = StateStore(own.url, key_prefix="t")
        assert await store.save([SlotWrite("a", b"", record(1), 60_000)], soon()) == [APPLIED]
        own.client().config_set("maxmemory", "1")  # every write is refused from now on (noeviction)
        (result,) = await store.save([SlotWrite("b", b"", record(2), 60_000)], soon())
        assert result.code == grpc.StatusCode.UNAVAILABLE and "not applied" in result.message, result
        assert dict(result.trailing_metadata())["x-chunk-outcome"] == "not-applied"
        a, b = await store.load(["a", "b"], soon())
        assert a.offset == 1 and b is None
        await store.close()

    try:
        asyncio.run(scenario())
    finally:
        own.stop()
