"""The batcher alone: batches never hold two chunks of a stream, a stream's chunks never run at once
and keep their order, batches respect max_batch, conflicts run again."""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest

from server.config import ServerConfig
from server.dataplane.batcher import Batcher
from server.dataplane.processor import ModelSchedule
from server.types import CONFLICT, Chunk, Prediction

pytestmark = pytest.mark.timeout(60)


def batcher_with(process, **settings: object) -> Batcher:
    """A batcher with the server's default settings, except `settings`."""
    config = ServerConfig()
    defaults = {"max_batch": config.max_batch, "max_delay_s": config.max_delay_s,
                "max_in_flight": config.max_in_flight, "max_queued": config.max_queued_chunks}
    return Batcher(process, **{**defaults, **settings})  # type: ignore[arg-type]


def chunk(stream: str, number: int) -> Chunk:
    return Chunk(stream, np.full((1, 1), number, np.float32))


def test_order_exclusivity_and_batch_size() -> None:
    running: set[str] = set()
    seen: dict[str, list[int]] = {}
    sizes: list[int] = []

    async def process(chunks):
        streams = [c.stream_id for c in chunks]
        assert len(set(streams)) == len(streams), "two chunks of one stream in a batch"
        assert not running.intersection(streams), "a stream in two running batches"
        running.update(streams)
        sizes.append(len(chunks))
        await asyncio.sleep(random.random() / 500)
        running.difference_update(streams)
        for c in chunks:
            seen.setdefault(c.stream_id, []).append(int(c.values[0, 0]))
        return [Prediction(c.stream_id, c.values, 0) for c in chunks]

    async def scenario() -> None:
        batcher = batcher_with(process, max_batch=8, max_in_flight=3)
        batcher.start()
        calls = [batcher.predict(chunk(f"s{n % 13}", n)) for n in range(400)]
        await asyncio.gather(*calls)
        await batcher.stop()

    asyncio.run(scenario())
    for stream, numbers in seen.items():
        assert numbers == sorted(numbers), stream
    assert sum(sizes) == 400 and max(sizes) <= 8 and max(sizes) > 1


def test_conflicts_run_again_then_give_up() -> None:
    attempts: dict[str, int] = {}

    async def process(chunks):
        results = []
        for c in chunks:
            attempts[c.stream_id] = attempts.get(c.stream_id, 0) + 1
            flaky = c.stream_id == "flaky" and attempts[c.stream_id] < 3
            results.append(CONFLICT if flaky or c.stream_id == "hopeless" else Prediction(c.stream_id, c.values, 1))
        return results

    async def scenario():
        batcher = batcher_with(process, max_conflicts=4)
        batcher.start()
        flaky, hopeless = await asyncio.gather(
            batcher.predict(chunk("flaky", 1)), batcher.predict(chunk("hopeless", 2)), return_exceptions=True
        )
        await batcher.stop()
        return flaky, hopeless

    flaky, hopeless = asyncio.run(scenario())
    assert isinstance(flaky, Prediction) and attempts["flaky"] == 3
    assert "kept changing" in str(hopeless) and attempts["hopeless"] == 5


def test_next_batch_starts_before_the_last_batchs_callers_are_answered() -> None:
    """A finished batch's callers (on the server: protobuf and writes on the event loop) run after the next
    batch has started, so their replies overlap its model call instead of delaying it. Still one batch at a
    time (max_in_flight 1), a stream's next chunk only after its last one is saved, answers in order."""
    events: list[str] = []
    release = asyncio.Event()  # bound to the loop at first use

    async def process(chunks):
        names = ",".join(f"{c.stream_id}{int(c.values[0, 0])}" for c in chunks)
        events.append(f"start {names}")
        if names == "a1":
            await release.wait()  # hold batch 1 until the other streams' chunks are queued
        events.append(f"end {names}")
        return [Prediction(c.stream_id, c.values, 1) for c in chunks]

    async def caller(batcher: Batcher, stream: str, number: int) -> None:
        await batcher.predict(chunk(stream, number))
        events.append(f"answered {stream}{number}")

    async def scenario() -> None:
        batcher = batcher_with(process, max_in_flight=1)
        batcher.start()
        first = asyncio.create_task(caller(batcher, "a", 1))
        await asyncio.sleep(0.01)  # batch 1 (a1) is running
        rest = [asyncio.create_task(caller(batcher, s, n)) for s, n in (("b", 1), ("a", 2))]
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(first, *rest)
        await batcher.stop()

    asyncio.run(scenario())
    second = events.index("start b1,a2")  # a2 joins: a1 is saved, its stream free
    assert events.index("end a1") < second < events.index("answered a1"), events
    assert events.index("answered a1") < events.index("answered a2"), events


def test_a_batch_grows_while_the_model_is_busy_and_starts_when_it_is_free() -> None:
    """With a second batch slot, chunks that arrive while a batch is in its model call wait for it to end (they
    could not run sooner) and then run as one batch; a chunk that finds the model idle starts at once."""
    model = {"busy": False}
    gate = asyncio.Event()
    sizes: list[int] = []

    async def process(chunks):
        sizes.append(len(chunks))
        if len(sizes) == 1:  # the first batch holds the model until the test lets it go
            model["busy"] = True
            await gate.wait()
            model["busy"] = False
            batcher.wake()
        return [Prediction(c.stream_id, c.values, 0) for c in chunks]

    async def scenario() -> None:
        batcher.start()
        first = batcher.predict(chunk("first", 0))
        first_task = asyncio.ensure_future(first)
        await asyncio.sleep(0.05)
        assert sizes == [1]  # started at once: the model was idle
        others = [asyncio.ensure_future(batcher.predict(chunk(f"s{n}", n))) for n in range(5)]
        await asyncio.sleep(0.05)
        assert sizes == [1], "a batch started while the model was busy"
        gate.set()
        await asyncio.gather(first_task, *others)
        assert sizes == [1, 5]
        lone = await asyncio.wait_for(batcher.predict(chunk("lone", 9)), 1)  # idle model: no wait
        assert lone.stream_id == "lone" and sizes == [1, 5, 1]
        await batcher.stop()

    batcher = batcher_with(process, max_in_flight=2, max_batch=64, max_delay_s=0.0,
                           model_free_in=lambda: 60.0 if model["busy"] else 0.0)  # type: ignore[arg-type]
    asyncio.run(scenario())


def test_a_waiting_batch_starts_when_it_would_reach_the_model_as_the_model_becomes_free() -> None:
    """The batch that grows while another is in its model call starts when the processor expects it to reach the
    model as that call ends (`model_free_in` down to 0), without waiting for the call to end: its loads and rules
    overlap the end of the call."""
    gate = asyncio.Event()
    sizes: list[int] = []
    started: list[float] = []
    expected_free = {"at": 0.0}

    async def process(chunks):
        sizes.append(len(chunks))
        started.append(time.monotonic())
        if len(sizes) == 1:  # in its model call until the test ends it; expected done within 0.2 s
            expected_free["at"] = time.monotonic() + 0.2
            await gate.wait()
        return [Prediction(c.stream_id, c.values, 0) for c in chunks]

    def model_free_in() -> float:
        return expected_free["at"] - time.monotonic() if len(sizes) == 1 else 0.0

    async def scenario() -> None:
        batcher.start()
        first = asyncio.ensure_future(batcher.predict(chunk("first", 0)))
        await asyncio.sleep(0.02)
        others = [asyncio.ensure_future(batcher.predict(chunk(f"s{n}", n))) for n in range(3)]
        await asyncio.sleep(0.05)
        assert sizes == [1], "a batch started long before the model would be free"
        await asyncio.wait_for(asyncio.gather(*others), 5)  # the first batch's call has not ended
        assert sizes == [1, 3]
        assert 0.15 < started[1] - started[0] < 1.0, started
        gate.set()
        await first
        await batcher.stop()

    batcher = batcher_with(process, max_in_flight=2, max_batch=64, max_delay_s=0.0,
                           model_free_in=model_free_in)  # type: ignore[arg-type]
    asyncio.run(scenario())


def test_model_schedule_expects_the_model_free_after_its_recent_call_length() -> None:
    """The processor's estimate: the model's recent call length after the call in progress began, less a batch's
    recent time to reach the model; calls queued on the model thread are timed from when it took them."""
    schedule = ModelSchedule()
    assert schedule.free_in() == 0.0  # no batch in the model
    for call in range(40):  # calls of 0.1 s, one a second, batches 0.02 s from start to model call
        schedule.entered(time.monotonic() - 0.02)
        submitted_ns = call * 1_000_000_000
        schedule.ran(submitted_ns, submitted_ns + 100_000_000)
        assert schedule.left()
    assert abs(schedule.call_s - 0.1) < 0.001 and abs(schedule.prepare_s - 0.02) < 0.002
    schedule.entered(time.monotonic())
    assert 0.05 < schedule.free_in() < 0.09  # 0.1 - 0.02, give or take the time this test takes
    schedule.entered(time.monotonic())  # a second batch queued behind the first
    assert 0.15 < schedule.free_in() < 0.19
    assert not schedule.left() and schedule.left() and schedule.free_in() == 0.0
    # A call submitted while another ran is timed from the other's end, not from its own submission.
    done = schedule.last_done_ns
    schedule.ran(done - 50_000_000, done + 100_000_000)
    assert abs(schedule.call_s - 0.1) < 0.001


@pytest.mark.parametrize("busy_delay_s", [0.3, 0.0])
def test_while_several_callers_are_served_a_batch_waits_the_busy_delay_and_a_lone_caller_never_does(
        busy_delay_s: float) -> None:
    """After a batch that held chunks of two messages, the next batch waits --busy-delay-ms for the callers answered
    last, so a message arriving within it joins the batch; after a batch of one message (a lone caller) the next
    batch starts at once. Without the delay (0) the late message runs in a batch of its own."""
    sizes: list[int] = []

    async def process(chunks):
        sizes.append(len(chunks))
        return [Prediction(c.stream_id, c.values, 0) for c in chunks]

    def message(name: str, count: int) -> list[Chunk]:
        return [chunk(f"{name}{n}", n) for n in range(count)]

    async def scenario() -> None:
        batcher.start()
        # Two callers' messages queued together: one batch of both (nothing to wait for before the first batch).
        await asyncio.gather(*batcher.submit_many(message("a", 2)), *batcher.submit_many(message("b", 2)))
        assert sizes == [4]
        # One caller's message now, another's 0.1 s later: within the busy delay, they share a batch.
        first = batcher.submit_many(message("c", 2))
        await asyncio.sleep(0.1)
        second = batcher.submit_many(message("d", 3))
        await asyncio.wait_for(asyncio.gather(*first, *second), 5)
        assert sizes == ([4, 5] if busy_delay_s else [4, 2, 3]), sizes
        if busy_delay_s:
            # The last batch held two messages; then a lone caller: the batch after its first one starts at once.
            await asyncio.gather(*batcher.submit_many(message("e", 2)))  # waits the delay: the last batch had two
            began = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*batcher.submit_many(message("f", 2))), 5)
            assert time.monotonic() - began < busy_delay_s / 2, "a lone caller's batch waited for others"
            assert sizes == [4, 5, 2, 2]
        await batcher.stop()

    batcher = batcher_with(process, max_in_flight=2, max_batch=64, max_delay_s=0.0, busy_delay_s=busy_delay_s)
    asyncio.run(scenario())
