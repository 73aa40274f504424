"""The live verifier's checker (loadtest/live_verify.py) on hand-made answers, in this process.

Answers are Keras' own on whole sequences (loadtest/verify.py's reference), split into chunks of uneven
sizes and fed interleaved across streams, with the checker run at arbitrary points as the verifier does
while a load runs: a planted wrong value must be found at its stream and timestep and nowhere else, the
same as the whole-sequence check finds it; and a run twice as long must not hold more memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loadtest.live_verify import CarriedReference, LiveChecker
from loadtest.verify import KerasReference, verify_streams
from lstm_stream.client.types import ModelInfo
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(240)
TOLERANCE = 1e-4
PLANTED_STREAM, PLANTED_TIMESTEP = "s-3", 47


def model_info(reference: KerasReference, per_timestep: bool) -> ModelInfo:
    output = reference.model.outputs[0].shape[-1]
    return ModelInfo(name="m", fingerprint="", input_features=reference.features, output_size=output,
                     per_timestep_outputs=per_timestep, max_chunk_timesteps=64, recurrent_layers=2, state_size=256)


def answered_chunks(reference: KerasReference, streams: int, timesteps: int, per_timestep: bool,
                    seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray, int]]:
    """Every stream's chunks (uneven sizes 1..11) with Keras' answers, interleaved in a random order that
    keeps each stream's own order; one value planted wrong."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(streams, timesteps, reference.features)).astype(np.float32)
    y = reference(x)
    per_stream = []
    for s in range(streams):
        chunks, at = [], 0
        while at < timesteps:
            size = min(int(rng.integers(1, 12)), timesteps - at)
            rows = y[s, at:at + size].copy() if per_timestep else y[s, at + size - 1:at + size].copy()
            if f"s-{s}" == PLANTED_STREAM and at <= PLANTED_TIMESTEP < at + size:
                row = PLANTED_TIMESTEP - at if per_timestep else 0
                rows[row, 0] += 0.01
            chunks.append((f"s-{s}", x[s, at:at + size], rows, at + size))
            at += size
        per_stream.append(chunks)
    order = [s for s in range(streams) for _ in per_stream[s]]
    rng.shuffle(order)
    positions = [0] * streams
    interleaved = []
    for s in order:
        interleaved.append(per_stream[s][positions[s]])
        positions[s] += 1
    return interleaved


def feed(checker: LiveChecker, chunks: list[tuple[str, np.ndarray, np.ndarray, int]], check_every: int) -> None:
    for n, (stream_id, x, y, offset) in enumerate(chunks, 1):
        checker.add(stream_id, 0, x, y, offset)
        if n % check_every == 0:
            checker.check_pending()
    checker.check_pending(drain=True)


@pytest.fixture(scope="module")
def carried() -> CarriedReference:
    return CarriedReference(DEFAULT_MODEL, 1, batch=8)


@pytest.mark.parametrize("check_every", [7, 50], ids=["small-rounds", "large-rounds"])
def test_a_planted_wrong_answer_is_found_at_its_stream_and_timestep(carried: CarriedReference,
                                                                    check_every: int) -> None:
    streams = [f"s-{s}" for s in range(6)]
    checker = LiveChecker(carried, per_timestep=True, tolerance=TOLERANCE, sampled=set(streams),
                          sample_timesteps=10_000)
    feed(checker, answered_chunks(carried.whole, 6, 120, per_timestep=True), check_every)
    live = checker.result()
    assert live["rows_compared"] == 6 * 120 and live["timesteps"] == 6 * 120
    assert [(m["stream_id"], m["timestep"], m["rows_over_tolerance"]) for m in live["mismatches"]] == \
        [(PLANTED_STREAM, PLANTED_TIMESTEP, 1)]
    assert live["mismatches"][0]["abs_diff"] == pytest.approx(0.01, abs=1e-4)
    assert live["mismatches"][0]["offset_drift"] is None
    # The whole-sequence check on the same answers (the sample kept every stream) says the same.
    whole = verify_streams(DEFAULT_MODEL, model_info(carried.whole, True), list(checker.logs.values()), [],
                           TOLERANCE, carried.whole)
    assert whole["rows_compared"] == live["rows_compared"]
    assert [(m["stream_id"], m["timestep"], m["rows_over_tolerance"]) for m in whole["mismatches"]] == \
        [(PLANTED_STREAM, PLANTED_TIMESTEP, 1)]


def test_a_last_step_model_is_checked_at_each_chunks_last_timestep(small_models: dict[str, Path]) -> None:
    reference = CarriedReference(small_models["last_step"], 2, batch=4)
    checker = LiveChecker(reference, per_timestep=False, tolerance=TOLERANCE, sampled=set(), sample_timesteps=1)
    chunks = answered_chunks(reference.whole, 4, 90, per_timestep=False, seed=3)
    feed(checker, chunks, 5)
    live = checker.result()
    assert live["rows_compared"] == len(chunks)
    planted = [m for m in live["mismatches"]]
    assert [m["stream_id"] for m in planted] == [PLANTED_STREAM]
    # A last-step model answers at the chunk's last timestep: the planted chunk's.
    ends = [end for stream_id, _, _, end in chunks if stream_id == PLANTED_STREAM]
    chunk_end = next(end for end in ends if end > PLANTED_TIMESTEP)
    assert planted[0]["timestep"] == chunk_end - 1


def test_an_offset_the_server_got_wrong_is_named(carried: CarriedReference) -> None:
    checker = LiveChecker(carried, per_timestep=True, tolerance=TOLERANCE, sampled=set(), sample_timesteps=1)
    chunks = answered_chunks(carried.whole, 2, 30, per_timestep=True)
    for stream_id, x, y, offset in chunks:
        checker.add(stream_id, 0, x, y, offset if stream_id != "s-1" or offset < 20 else offset - 20)
    checker.check_pending(drain=True)
    drift = {m["stream_id"]: m["offset_drift"] for m in checker.result()["mismatches"]}
    assert drift == {}  # the answers were right: only the offsets were wrong, and the report keeps them below
    sequence = checker.sequences[("s-1", 0)]
    assert sequence.offset_drift is not None and sequence.offset_drift["expected_offset"] >= 20


def test_a_server_that_names_no_version_is_not_a_version_change_but_another_version_is(
        carried: CarriedReference) -> None:
    """During a rolling upgrade from 0.1.0 (which names no version: 0) a sequence's chunks come from both releases;
    with one model file that is one version. A sequence answered by versions 1 and then 2 is an error."""
    checker = LiveChecker(carried, per_timestep=True, tolerance=TOLERANCE, sampled=set(), sample_timesteps=1)
    chunks = answered_chunks(carried.whole, 2, 30, per_timestep=True, seed=3)
    for n, (stream_id, x, y, offset) in enumerate(chunks):
        answered_by = n % 2 if stream_id == "s-0" else (1 if offset <= 15 else 2)  # s-0: 0.1.0 and 0.2.0 in turn
        checker.add(stream_id, 0, x, y, offset, answered_by)
    changes = checker.result()["version_changes"]
    assert [(c["stream_id"], c["from_version"], c["to_version"]) for c in changes] == [("s-1", 1, 2)]


def test_a_run_twice_as_long_holds_no_more_memory(carried: CarriedReference) -> None:
    held = []
    for timesteps in (200, 400):
        checker = LiveChecker(carried, per_timestep=True, tolerance=TOLERANCE, sampled={"s-0"}, sample_timesteps=50)
        feed(checker, answered_chunks(carried.whole, 8, timesteps, per_timestep=True), 16)
        assert checker.result()["rows_compared"] == 8 * timesteps
        held.append(checker.held_bytes_max)
    # Bounded by the streams (their states and what waits between two checks), not by the run's length.
    assert held[1] <= held[0] * 1.25, held
    # The sample keeps at most sample_timesteps of its sequence: 50 inputs and 50 answers of one float.
    kept = sum(a.nbytes for segment in checker.logs["s-0"].segments for a in (*segment.inputs, *segment.outputs))
    assert kept <= 2 * 50 * 4
