"""Invariant 1 (docs/invariants.md): a stream cut into chunks gets exactly what Keras gives the whole sequence.

50 streams of random lengths, cut at random points, sent at once: half chunk by chunk over unary
Predict, half interleaved over a few PredictStream connections, so every batch mixes streams, chunk
lengths and positions.
"""

from __future__ import annotations

import asyncio
import itertools
import random

import grpc
import numpy as np
import pytest

from devkit.metrics import scrape, value
from devkit.native_calls import outputs, request
from devkit.references import TOLERANCE, keras_whole_sequences
from devkit.small_models import build_gru_stateful
from lstm_stream.v1 import stream_pb2_grpc
from server.config import DEFAULT_MODEL

STREAMS = 50
MAX_LENGTH = 300


def make_streams(seed: int, features: int, prefix: str) -> dict[str, tuple[np.ndarray, list[int]]]:
    """stream id -> (sequence [T, features], chunk lengths that add up to T)."""
    rng = np.random.default_rng(seed)
    streams = {}
    for n in range(STREAMS):
        length = int(rng.integers(1, MAX_LENGTH + 1))
        cuts = sorted(set(rng.integers(1, length, size=int(rng.integers(0, 8))).tolist())) if length > 1 else []
        bounds = [0, *cuts, length]
        sequence = rng.normal(0, 1.5, size=(length, features)).astype(np.float32)
        streams[f"{prefix}-{n}"] = (sequence, [b - a for a, b in itertools.pairwise(bounds)])
    return streams


def chunk_requests(stream_id: str, sequence: np.ndarray, lengths: list[int], use_offsets: bool):
    start = 0
    for number, length in enumerate(lengths):
        yield request(stream_id, sequence[start : start + length], reset=number == 0,
                      start_offset=start if use_offsets else None)
        start += length


async def run_all(address: str, streams: dict[str, tuple[np.ndarray, list[int]]]) -> dict[str, np.ndarray]:
    ids = list(streams)
    unary_ids, streaming_ids = ids[::2], ids[1::2]
    # Half the unary streams send start offsets, half append (a seeded choice: the same on every run).
    with_offsets = set(random.Random(len(ids)).sample(unary_ids, len(unary_ids) // 2))
    results: dict[str, list[np.ndarray]] = {stream_id: [] for stream_id in ids}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = stream_pb2_grpc.StreamInferenceStub(channel)

        async def unary(stream_id: str) -> None:
            sequence, lengths = streams[stream_id]
            for message in chunk_requests(stream_id, sequence, lengths, use_offsets=stream_id in with_offsets):
                reply = await stub.Predict(message, timeout=60)
                results[stream_id].append(outputs(reply))

        async def connection(group: list[str], seed: int) -> None:
            # Interleave the group's chunks at random, keeping each stream's own order.
            queues = {s: list(chunk_requests(s, *streams[s], use_offsets=True)) for s in group}
            order = [s for s in group for _ in queues[s]]
            random.Random(seed).shuffle(order)
            messages = [queues[s].pop(0) for s in order]
            call = stub.PredictStream(iter(messages), timeout=60)
            async for reply in call:
                assert not reply.HasField("error"), reply.error.message
                results[reply.stream_id].append(outputs(reply))

        groups = [streaming_ids[i::5] for i in range(5)]
        await asyncio.gather(*(unary(s) for s in unary_ids), *(connection(g, i) for i, g in enumerate(groups)))
    return {stream_id: np.concatenate(chunks) for stream_id, chunks in results.items()}


def check_against_keras(model_path, streams, got) -> None:
    references = keras_whole_sequences(model_path, [sequence for sequence, _ in streams.values()])
    worst = 0.0
    for stream_id, expected in zip(streams, references, strict=True):
        assert got[stream_id].shape == expected.shape, stream_id
        diff = float(np.max(np.abs(got[stream_id] - expected)))
        assert diff <= TOLERANCE, f"{stream_id}: max abs diff {diff}"
        worst = max(worst, diff)
    print(f"max abs diff over {len(streams)} streams: {worst:.3g}")


@pytest.mark.timeout(180)
def test_default_model_chunks_equal_whole_sequence(default_server) -> None:
    streams = make_streams(seed=1, features=1, prefix="cont-default")
    got = asyncio.run(run_all(default_server.address, streams))
    check_against_keras(DEFAULT_MODEL, streams, got)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("path, limit", [("tensorflow", "0"), ("numpy", "1000000")])
def test_default_model_on_one_model_path_alone(start_server, path, limit) -> None:
    """Every batch on TensorFlow (XLA), then every batch on the NumPy twin: each path alone keeps invariant 1."""
    server = start_server("--numpy-max-batch-timesteps", limit)
    streams = make_streams(seed=3, features=1, prefix=f"cont-{path}")
    got = asyncio.run(run_all(server.address, streams))
    check_against_keras(DEFAULT_MODEL, streams, got)
    samples = scrape(server)
    other = "numpy" if path == "tensorflow" else "tensorflow"
    calls = value(samples, "lstm_serve_model_calls_total", path=path)
    assert calls > 0 and value(samples, "lstm_serve_model_calls_total", path=other) == 0, (calls, other)


@pytest.mark.timeout(240)
def test_stateful_gru_model_with_three_features(start_server, tmp_path) -> None:
    model_path = build_gru_stateful(tmp_path / "gru_stateful.keras")
    server = start_server("--max-batch", "16", model=model_path)
    streams = make_streams(seed=2, features=3, prefix="cont-gru")
    got = asyncio.run(run_all(server.address, streams))
    check_against_keras(model_path, streams, got)
