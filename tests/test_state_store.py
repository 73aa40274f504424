"""The Redis state store on its own: record format, batch load, compare-and-set, expiry, bad records."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import numpy as np
import pytest

from server.state.record import HEADER_SIZE, SlotRecord, new_version
from server.state.store import APPLIED, REFUSED, SlotWrite, StateStore
from tests.client import predict, request, status_of

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
    assert len(data) == HEADER_SIZE + 4 * (256 + 20)
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
