"""The client's gateway (`client.gateway()`: many streams' chunks per message) against a real server and Redis.

Invariant 1 (docs/invariants.md) through a gateway: many streams, random chunk lengths, streams missing from
some ticks, new sequences (`start_new`) and ends in the middle, sync and asyncio, one message a tick (`send`)
and pipelined (`pipe`): every stream's outputs equal Keras on each of its sequences. Invariant 17: a bad
stream in a tick fails alone (its own error, the others' outputs delivered), on both ways of sending; and a
chunk longer than the server takes, or a tick with more streams than a message may carry, is split.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from dataclasses import dataclass, field

import numpy as np
import pytest

from devkit.references import TOLERANCE, keras_whole_sequence, keras_whole_sequences
from lstm_stream.client import (
    AsyncClient,
    ChunksFailed,
    Client,
    GatewayResult,
    InvalidInput,
    RequestRejected,
    StreamPositionError,
    Tick,
)
from lstm_stream.client.cli import EXIT_OK, EXIT_USAGE
from server.config import DEFAULT_MODEL
from tests.serving.test_client_cli import cli

pytestmark = pytest.mark.timeout(120)


@dataclass
class Script:
    """Ticks for many streams and what Keras answers: each stream runs one to three sequences, one after
    another, the next begun by `start_new` or after an `end`; a stream sits out some ticks."""

    sequences: dict[str, list[np.ndarray]]
    ticks: list[Tick] = field(default_factory=list)
    # stream id -> [(sequence number, rows of that sequence)] per chunk, in order
    chunks: dict[str, list[tuple[int, slice]]] = field(default_factory=dict)

    @classmethod
    def random(cls, seed: int, streams: int, prefix: str) -> Script:
        rng = np.random.default_rng(seed)
        tag = uuid.uuid4().hex[:6]
        sequences = {f"{prefix}-{tag}-{n}": [rng.normal(0, 1.5, size=(int(rng.integers(5, 50)), 1)).astype(np.float32)
                                             for _ in range(int(rng.integers(1, 4)))] for n in range(streams)}
        script = cls(sequences)
        events: dict[str, list[tuple[np.ndarray, bool, bool, int, slice]]] = {}
        for stream_id, runs in sequences.items():
            queue, ended = [], True
            for number, x in enumerate(runs):
                cuts = sorted(set(rng.integers(1, len(x), size=int(rng.integers(0, 4))).tolist())) if len(x) > 1 else []
                bounds = [0, *cuts, len(x)]
                end = bool(rng.integers(0, 2))
                for index, (a, b) in enumerate(itertools.pairwise(bounds)):
                    first, last = index == 0, index == len(bounds) - 2
                    start_new = first and number > 0 and not ended  # a new sequence without an end before it
                    queue.append((x[a:b], last and end, start_new, number, slice(a, b)))
                ended = end
            events[stream_id] = queue
        while any(events.values()):
            present = [s for s, queue in events.items() if queue and rng.random() < 0.8]
            values, end, start_new = {}, set(), set()
            for stream_id in present:
                x, is_end, is_new, number, rows = events[stream_id].pop(0)
                values[stream_id] = x
                end |= {stream_id} if is_end else set()
                start_new |= {stream_id} if is_new else set()
                script.chunks.setdefault(stream_id, []).append((number, rows))
            script.ticks.append(Tick(values, frozenset(end), frozenset(start_new)))
        return script

    def start(self, gateway) -> None:  # type: ignore[no-untyped-def]
        for stream_id in self.sequences:
            gateway.start_new(stream_id)  # ids are fresh, but say so: the first chunk starts a sequence

    def check(self, results: list[GatewayResult], what: str) -> None:
        assert len(results) == len(self.ticks), what
        got: dict[str, list[np.ndarray]] = {}
        for tick, result in zip(self.ticks, results, strict=True):
            assert result.ok, f"{what}: {result.errors}"
            assert list(result.outputs) == list(tick.values), what  # every stream answered, in the tick's order
            for stream_id, outputs in result.outputs.items():
                assert outputs.shape == (len(tick.values[stream_id]), 1), what
                got.setdefault(stream_id, []).append(outputs)
        flat = [(s, n) for s, runs in self.sequences.items() for n in range(len(runs))]
        expected = dict(zip(flat, keras_whole_sequences(DEFAULT_MODEL, [self.sequences[s][n] for s, n in flat]),
                            strict=True))
        worst = 0.0
        for stream_id, chunks in self.chunks.items():
            assert len(got[stream_id]) == len(chunks), what
            for outputs, (number, rows) in zip(got[stream_id], chunks, strict=True):
                worst = max(worst, float(np.max(np.abs(outputs - expected[stream_id, number][rows]))))
        assert worst <= TOLERANCE, f"{what}: max abs diff {worst}"


def test_many_streams_through_send_and_pipe_sync_and_async_equal_keras(default_server) -> None:
    scripts = {way: Script.random(seed, 24, f"gw-{way}")
               for seed, way in enumerate(["sync-send", "sync-pipe", "async-send", "async-pipe"])}
    results: dict[str, list[GatewayResult]] = {}
    with Client(default_server.address) as client:
        gateway = client.gateway()
        scripts["sync-send"].start(gateway)
        results["sync-send"] = [gateway.send(tick.values, end=tick.end, start_new=tick.start_new)
                                for tick in scripts["sync-send"].ticks]
        piped = client.gateway()
        scripts["sync-pipe"].start(piped)
        results["sync-pipe"] = list(piped.pipe(iter(scripts["sync-pipe"].ticks), window=3))
        for stream_id, chunks in scripts["sync-pipe"].chunks.items():
            info = client.stream_info(stream_id)
            if info.exists:  # the stream's last sequence did not end: the server stands at its length
                assert info.offset == chunks[-1][1].stop == piped.offset(stream_id), stream_id
            else:
                assert piped.offset(stream_id) == 0, stream_id

    async def run_async() -> None:
        async with AsyncClient(default_server.address) as client:
            gateway = client.gateway()
            scripts["async-send"].start(gateway)
            piped = client.gateway()
            scripts["async-pipe"].start(piped)

            async def ticks():  # type: ignore[no-untyped-def]
                for tick in scripts["async-pipe"].ticks:
                    await asyncio.sleep(0)
                    yield tick

            async def sends() -> list[GatewayResult]:
                return [await gateway.send(t.values, end=t.end, start_new=t.start_new)
                        for t in scripts["async-send"].ticks]

            async def pipe() -> list[GatewayResult]:
                return [result async for result in piped.pipe(ticks())]

            results["async-send"], results["async-pipe"] = await asyncio.gather(sends(), pipe())

    asyncio.run(run_async())
    for way, script in scripts.items():
        script.check(results[way], way)


def test_a_bad_stream_fails_alone(default_server) -> None:
    """A stream the server holds at another offset gets StreamPositionError, a bad id RequestRejected, each
    in its own entry; the other streams' outputs are delivered, by `send` and by `pipe`; resume() mends it."""
    x = np.random.default_rng(5).normal(size=(30, 1)).astype(np.float32)
    tag = uuid.uuid4().hex[:6]
    good, other, moved, bad = f"gw-good-{tag}", f"gw-other-{tag}", f"gw-moved-{tag}", "gw-bad\x07id"
    with Client(default_server.address) as client:
        client.stream(moved).send(x[:4])  # someone else moved it to offset 4
        gateway = client.gateway()
        result = gateway.send({good: x[:10], moved: x[4:10], bad: x[:10], other: x[:10]})
        assert list(result.outputs) == [good, other] and list(result.errors) == [moved, bad]
        position = result.errors[moved]
        assert isinstance(position, StreamPositionError)
        assert (position.client_offset, position.server_offset) == (0, 4)
        assert isinstance(result.errors[bad], RequestRejected) and "stream_id" in str(result.errors[bad])
        with pytest.raises(StreamPositionError):
            result[moved]
        with pytest.raises(ChunksFailed) as failed:
            result.raise_for_errors()
        assert set(failed.value.errors) == {moved, bad} and set(failed.value.outputs) == {good, other}
        assert "2 of 4 streams failed" in str(failed.value)
        expected = keras_whole_sequence(DEFAULT_MODEL, x)
        assert np.max(np.abs(result[good] - expected[:10])) <= TOLERANCE
        assert client.stream_info(moved).offset == 4 and gateway.offset(good) == 10  # the refusal changed nothing

        assert gateway.resume(moved) == 4
        again = gateway.send({good: x[10:20], moved: x[4:20]}).raise_for_errors()
        assert np.max(np.abs(again[good] - expected[10:20])) <= TOLERANCE
        assert np.max(np.abs(again[moved] - expected[4:20])) <= TOLERANCE

        # The same in a pipe: the stream the server holds elsewhere fails in every tick, the others do not.
        piped = client.gateway()
        ticks = [{f"{good}-p": x[i:i + 5], moved: x[i:i + 5]} for i in range(0, 15, 5)]
        results = list(piped.pipe(ticks))
        assert all(isinstance(r.errors.get(moved), StreamPositionError) for r in results)
        got = np.concatenate([r[f"{good}-p"] for r in results])
        assert np.max(np.abs(got - expected[:15])) <= TOLERANCE
        assert client.stream_info(moved).offset == 20

        # Values of the wrong shape: refused before anything is sent.
        with pytest.raises(InvalidInput, match="gw-good"):
            gateway.send({good: np.zeros((3, 2), np.float32), other: x[:3]})
        assert gateway.offset(good) == 20 and gateway.offset(other) == 10
        # end() finishes one stream's sequence: its state is gone.
        assert np.max(np.abs(gateway.end(good, x[20:]) - expected[20:])) <= TOLERANCE
        assert not client.stream_info(good).exists and gateway.offset(good) == 0


def test_long_chunks_and_wide_ticks_are_split(start_server) -> None:
    """A server that takes 8 timesteps a chunk and 4 chunks a message: 10 streams with chunks of up to 30
    timesteps go in several messages a tick, each stream's pieces in order, by send and by pipe."""
    server = start_server("--max-chunk-timesteps", "8", "--max-batch-chunks", "4", "--xla", "false")
    rng = random.Random(3)
    with Client(server.address) as client:
        assert client.model().max_batch_chunks == 4
        for way in ("send", "pipe"):
            script = Script.random(rng.randint(0, 1000), 10, f"gw-split-{way}")
            gateway = client.gateway(max_message_timesteps=20)
            script.start(gateway)
            if way == "send":
                results = [gateway.send(t.values, end=t.end, start_new=t.start_new) for t in script.ticks]
            else:
                results = list(gateway.pipe(script.ticks, window=8))
            script.check(results, f"split, {way}")


def test_cli_predicts_many_streams_from_one_csv(default_server, tmp_path) -> None:
    """`lstm-stream predict --stream-column`: rows of three streams interleaved in one file; every stream's
    outputs equal Keras, its lines marked with its id; --resume continues them all, and a bad stream id in
    the file fails alone (exit 2, the others written)."""
    rng = np.random.default_rng(8)
    tag = uuid.uuid4().hex[:6]
    signals = {f"cli-gw-{tag}-{n}": rng.normal(size=(int(rng.integers(5, 30)), 1)).astype(np.float32)
               for n in range(3)}
    order = [s for s, x in signals.items() for _ in range(len(x))]
    random.Random(1).shuffle(order)  # interleaved; each stream's rows stay in order below
    taken = dict.fromkeys(signals, 0)
    lines = ["time,sensor,value"]
    for number, stream_id in enumerate(order):
        lines.append(f"{number},{stream_id},{signals[stream_id][taken[stream_id], 0]:.9g}")
        taken[stream_id] += 1
    path = tmp_path / "ticks.csv"
    path.write_text("\n".join(lines) + "\n")
    # The time column is a feature too: a two-feature file for a one-feature model is refused at once.
    refused = cli("predict", "--stream-column", "sensor", str(path), target=default_server.address)
    assert refused.returncode == EXIT_USAGE and "[timesteps, 1]" in refused.stderr, refused.stderr
    path.write_text("\n".join(",".join(line.split(",")[1:]) for line in lines) + "\n")

    result = cli("predict", "--stream-column", "sensor", str(path), "--chunk", "4", target=default_server.address)
    assert result.returncode == EXIT_OK, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header == "sensor,output_0"
    got: dict[str, list[float]] = {}
    for row in rows:
        stream_id, value = row.split(",")
        got.setdefault(stream_id, []).append(float(value))
    expected = keras_whole_sequences(DEFAULT_MODEL, list(signals.values()))
    for stream_id, want in zip(signals, expected, strict=True):
        assert np.max(np.abs(np.array(got[stream_id]).reshape(-1, 1) - want)) <= TOLERANCE, stream_id
    assert "3 of 3 streams" in result.stderr

    # --resume continues every stream where the server stands; a bad stream id fails alone (exit 2).
    bad = "b" * 300
    path.write_text(path.read_text() + f"{bad},0.5\n")
    resumed = cli("predict", "--stream-column", "sensor", str(path), "--resume", target=default_server.address)
    assert resumed.returncode == EXIT_USAGE, resumed.stderr
    assert "3 of 4 streams" in resumed.stderr and "stream_id" in resumed.stderr, resumed.stderr
    assert {row.split(",")[0] for row in resumed.stdout.splitlines()[1:]} == set(signals)
    with Client(default_server.address) as client:
        assert [client.stream_info(s).offset for s in signals] == [2 * len(x) for x in signals.values()]
    usage = cli("predict", "sensor-1", "--stream-column", "sensor", str(path), target=default_server.address)
    assert usage.returncode == EXIT_USAGE and "--stream-column" in usage.stderr
