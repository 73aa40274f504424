"""The stream rules' choice of a model version, in process (invariant 14, docs/invariants.md): a sequence stays on
the version whose fingerprint its slot carries; a new one starts on the newest; a slot of a version no longer
served gets --on-retired-version; a fingerprint the shared registry could not place, or one being loaded, waits."""

from __future__ import annotations

import grpc
import numpy as np

from server.dataplane.rules import Planned, StreamRules, chunk_digest
from server.dataplane.versions import ModelVersions, ServingVersion
from server.errors import ServiceError
from server.state.record import SlotRecord
from server.types import Chunk, ModelDescription


class _Runner:
    """What the rules read of a model version: its fingerprint and a one-value zero state."""

    state_size = 1
    max_chunk_timesteps = 64

    def __init__(self, fingerprint: str) -> None:
        self.description = ModelDescription("m", fingerprint, input_features=1, output_size=1,
                                            per_timestep_outputs=True, state_size=1)

    def zero_states(self, batch: int) -> np.ndarray:
        return np.zeros((batch, 1), np.float32)


def versions(*numbers: int) -> ModelVersions:
    table = ModelVersions("m")
    for number in numbers:
        table.add(ServingVersion(number, _Runner(f"{number:02d}" * 8)))  # type: ignore[arg-type]
    return table


def chunk(timesteps: int, **fields: object) -> Chunk:
    return Chunk("s", np.arange(timesteps, dtype=np.float32).reshape(-1, 1), **fields)  # type: ignore[arg-type]


def slot_after(rules: StreamRules, planned: Planned) -> SlotRecord:
    values = planned.chunk.values
    return SlotRecord.decode(rules.record_after(planned, values, np.full(1, 0.5, np.float32), 1).encode())


def started(rules: StreamRules, first: Chunk) -> SlotRecord:
    planned = rules.plan(0, first, chunk_digest(first), None)
    assert isinstance(planned, Planned)
    return slot_after(rules, planned)


def test_a_sequence_stays_on_its_version_and_new_ones_start_on_the_newest_or_the_one_named() -> None:
    table = versions(1)
    rules = StreamRules(table)
    slot = started(rules, chunk(4, start_offset=0))
    table.add(ServingVersion(2, _Runner("02" * 8)))  # type: ignore[arg-type]
    table.retire(1, "a newer version arrived")
    going_on = rules.plan(0, chunk(2, start_offset=4), b"d" * 16, slot)
    assert isinstance(going_on, Planned) and going_on.version is not None and going_on.version.number == 1
    fresh = rules.plan(0, chunk(2), b"e" * 16, None)
    assert isinstance(fresh, Planned) and fresh.version is not None and fresh.version.number == 2
    # A draining version takes no new sequence; naming another version than the sequence's is refused.
    refused = rules.plan(0, chunk(2, model_version=1), b"f" * 16, None)
    assert isinstance(refused, ServiceError) and refused.code == grpc.StatusCode.NOT_FOUND
    assert "ready: 2" in str(refused)
    moved = rules.plan(0, chunk(2, start_offset=4, model_version=2), b"g" * 16, slot)
    assert isinstance(moved, ServiceError) and moved.code == grpc.StatusCode.FAILED_PRECONDITION


def test_a_dropped_versions_sequence_is_refused_reset_or_replayed_from_its_history() -> None:
    for policy in ("refuse", "reset", "replay"):
        table = versions(1)
        rules = StreamRules(table, policy, history_timesteps=16)
        first = chunk(5, start_offset=0)
        slot = started(rules, first)
        assert slot.history_rows == 5 and slot.history_start == 0
        table.add(ServingVersion(2, _Runner("02" * 8)))  # type: ignore[arg-type]
        table.retire(1, "unloaded", unload_requested=True)
        table.drop(1, "drained")
        outcome = rules.plan(0, chunk(3, start_offset=5), b"h" * 16, slot)
        if policy == "refuse":
            assert isinstance(outcome, ServiceError) and outcome.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "version 1, which was retired" in str(outcome)
            continue
        assert isinstance(outcome, Planned) and outcome.version is not None and outcome.version.number == 2
        assert (outcome.migration, outcome.migrated_from) == (policy, 1)
        if policy == "reset":
            assert outcome.base_offset == 0 and outcome.replay_inputs is None
        else:  # the state is rebuilt on v2 from the 5 kept inputs; the sequence goes on at offset 5
            assert outcome.base_offset == 5 and outcome.history_start == 0
            np.testing.assert_array_equal(outcome.replay_inputs, first.values)
            after = slot_after(rules, outcome)
            assert after.history_rows == 8 and after.fingerprint == table.get(2).fingerprint  # type: ignore[union-attr]


def test_the_history_keeps_the_last_timesteps_and_says_where_they_start() -> None:
    rules = StreamRules(versions(1), history_timesteps=4)
    slot = started(rules, chunk(3, start_offset=0))
    planned = rules.plan(0, chunk(3, start_offset=3), b"i" * 16, slot)
    assert isinstance(planned, Planned)
    slot = slot_after(rules, planned)
    assert (slot.history_rows, slot.history_start, slot.offset) == (4, 2, 6)
    np.testing.assert_array_equal(slot.history_inputs()[:, 0], [2, 0, 1, 2])
    ended = rules.plan(0, chunk(1, start_offset=6, end=True), b"j" * 16, slot)
    assert isinstance(ended, Planned) and slot_after(rules, ended).history == b""  # an ended sequence keeps none
    quiet = StreamRules(versions(1), history_timesteps=4, history_allowed=lambda: False)  # record format below 4
    assert started(quiet, chunk(3, start_offset=0)).history == b""


def test_a_fingerprint_being_loaded_or_not_yet_placed_waits_instead_of_being_taken_for_another_models() -> None:
    table = versions(2)
    rules = StreamRules(versions(1), "reset")
    slot = started(rules, chunk(2, start_offset=0))  # written by a v1 this table never loaded
    reset_rules = StreamRules(table, "reset")
    table.note_unresolved(slot.fingerprint)
    waiting = reset_rules.plan(0, chunk(1, start_offset=2), b"k" * 16, slot)
    assert isinstance(waiting, ServiceError) and waiting.code == grpc.StatusCode.UNAVAILABLE
    assert table.needs_locating(slot.fingerprint)  # asked again on the next try
    table.note_located(slot.fingerprint, 1, 60)
    table.mark(1, "LOADING")
    loading = reset_rules.plan(0, chunk(1, start_offset=2), b"k" * 16, slot)
    assert isinstance(loading, ServiceError) and loading.code == grpc.StatusCode.UNAVAILABLE
    assert "loading" in str(loading) and not table.needs_locating(slot.fingerprint)


def test_a_version_holding_the_same_model_as_a_dropped_one_keeps_its_sequences() -> None:
    """The same file copied in as a new version: dropping the old number leaves the fingerprint served."""
    table = ModelVersions("m")
    table.add(ServingVersion(1, _Runner("01" * 8)))  # type: ignore[arg-type]
    rules = StreamRules(table)
    slot = started(rules, chunk(3, start_offset=0))
    table.add(ServingVersion(2, _Runner("01" * 8)))  # type: ignore[arg-type]
    table.retire(1, "a newer version arrived")
    table.drop(1, "drained")
    going_on = rules.plan(0, chunk(2, start_offset=3), b"l" * 16, slot)
    assert isinstance(going_on, Planned) and going_on.version is not None and going_on.version.number == 2
