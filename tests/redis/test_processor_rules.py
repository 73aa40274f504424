"""The stream rules of server/dataplane/processor.py in-process, against a real Redis, with the identity runner
(no model call): what is recognised as a late duplicate and what is not (invariant 10), chunks whose
caller is gone (invariant 9), and records of format 1 continued after an upgrade."""

from __future__ import annotations

import asyncio
import struct
import time
import uuid

import grpc
import numpy as np
import pytest

from server.config import ServerConfig
from server.dataplane.processor import BatchProcessor, StreamPolicy
from server.dataplane.versions import ModelVersions
from server.model.identity import IdentityRunner
from server.state.record import RECENT_REQUESTS, SlotRecord
from server.state.store import StateStore
from server.types import BatchResult, Chunk, ModelDescription, Prediction, Runner

pytestmark = pytest.mark.timeout(60)

STATE_SIZE = 4


def run(redis_url: str, script) -> None:
    async def scenario() -> None:
        real = ModelDescription("m", "ab" * 8, input_features=1, output_size=1, per_timestep_outputs=True,
                                state_size=STATE_SIZE)
        runner = IdentityRunner(real, 64)
        assert isinstance(runner, Runner)
        store = StateStore(redis_url, key_prefix=f"r{uuid.uuid4().hex[:6]}")
        processor = BatchProcessor(ModelVersions.of(runner), store, StreamPolicy.from_config(ServerConfig()))
        try:
            await script(processor, store)
        finally:
            processor.close()
            await store.close()

    asyncio.run(scenario())


def chunk(value: float, **fields: object) -> Chunk:
    return Chunk("s", np.full((2, 1), value, np.float32), **fields)  # type: ignore[arg-type]


async def one(processor: BatchProcessor, item: Chunk) -> BatchResult:
    (result,) = await processor([item])
    return result


def test_recent_request_ids_are_a_window_of_the_last_16(redis_server) -> None:
    async def script(processor: BatchProcessor, store: StateStore) -> None:
        assert isinstance(await one(processor, chunk(0, reset=True)), Prediction)
        for n in range(1, RECENT_REQUESTS + 2):  # r1 .. r17
            result = await one(processor, chunk(n, request_id=f"r{n}"))
            assert isinstance(result, Prediction) and not result.replayed
        at = 2 * (RECENT_REQUESTS + 2)
        late = await one(processor, chunk(2, request_id="r2"))  # within the last 16: refused
        assert late.code == grpc.StatusCode.FAILED_PRECONDITION and late.current_offset == at
        # r1 has left the window: documented as not recognised, so it is appended.
        appended = await one(processor, chunk(1, request_id="r1"))
        assert isinstance(appended, Prediction) and appended.offset == at + 2
        # A reused request id with other data is another chunk, not a duplicate.
        other = await one(processor, chunk(99, request_id="r3"))
        assert isinstance(other, Prediction) and other.offset == at + 4

    run(redis_server.url, script)


def test_a_chunk_whose_deadline_passed_is_not_run(redis_server) -> None:
    async def script(processor: BatchProcessor, store: StateStore) -> None:
        assert (await one(processor, chunk(1, reset=True))).offset == 2
        gone = await one(processor, chunk(2, start_offset=2, deadline=time.monotonic() - 1))
        assert gone.code == grpc.StatusCode.DEADLINE_EXCEEDED and "not applied" in gone.message
        (slot,) = await store.load(["s"], time.monotonic() + 5)
        assert slot.offset == 2

    run(redis_server.url, script)


def test_a_format_1_record_is_continued_after_an_upgrade(redis_server) -> None:
    async def script(processor: BatchProcessor, store: StateStore) -> None:
        state, last = np.arange(STATE_SIZE, dtype="<f4"), np.zeros((2, 1), "<f4")
        header = struct.pack("<8s2sBBQq8sQ16s8sIII", b"12345678", b"LS", 1, 0, 7, 1,
                             processor.versions.newest().fingerprint, 5, bytes(16), bytes(8),
                             STATE_SIZE, 2, 1)
        redis = store._redis
        await redis.set(store.key("s"), header + state.tobytes() + last.tobytes())
        result = await one(processor, chunk(3, start_offset=7))
        assert isinstance(result, Prediction) and result.offset == 9
        (slot,) = await store.load(["s"], time.monotonic() + 5)
        assert isinstance(slot, SlotRecord) and slot.offset == 9
        np.testing.assert_array_equal(slot.state, state)  # the identity runner passes states through
        # Written back in the current format, the old record's last answer kept for its retries.
        assert (await redis.getrange(store.key("s"), 10, 10)) == b"\x03"
        assert [answer.start for answer in slot.earlier] == [5]

    run(redis_server.url, script)
