"""The batcher alone: batches never hold two chunks of a stream, a stream's chunks never run at once
and keep their order, batches respect max_batch, conflicts run again."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from server.batching.batcher import Batcher
from server.config import ServerConfig
from server.types import CONFLICT, Chunk, Prediction

pytestmark = pytest.mark.timeout(60)


def batcher_with(process, **settings: float) -> Batcher:
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
