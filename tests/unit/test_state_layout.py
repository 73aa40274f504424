"""State out and in, in process (invariant 15, docs/invariants.md): the slot's state vector as named tensors
and back (server/model/state_layout.py), and the record a SetStreamState writes (server/dataplane/rules.py
`set_record`): a new sequence at its offset that no chunk from before it is replayed or refused against.
tests/serving/test_state_io.py runs both behind gRPC against Keras."""

from __future__ import annotations

import numpy as np
import pytest

from server.dataplane.rules import Planned, StreamRules, chunk_digest, set_record
from server.dataplane.versions import ModelVersions
from server.errors import ServiceError
from server.model.state_layout import StateLayout
from server.state.record import SlotRecord
from server.types import Chunk, ModelDescription, RecurrentLayerInfo, StateTensor

pytestmark = pytest.mark.timeout(30)

LAYOUT = StateLayout([RecurrentLayerInfo("lstm", "LSTM", 3), RecurrentLayerInfo("gru", "GRU", 2),
                      RecurrentLayerInfo("rnn", "SimpleRNN", 1)])


def test_a_slot_splits_into_keras_named_tensors_in_slot_order_and_joins_back() -> None:
    state = np.arange(9, dtype=np.float32)
    tensors = LAYOUT.split(state)
    assert [(t.name, t.shape) for t in tensors] == [
        ("lstm/0", (3,)), ("lstm/1", (3,)), ("gru/0", (2,)), ("rnn/0", (1,))]
    np.testing.assert_array_equal(tensors[1].values, [3, 4, 5])  # the LSTM's c after its h
    np.testing.assert_array_equal(LAYOUT.join(tensors), state)
    np.testing.assert_array_equal(LAYOUT.join(tensors[::-1]), state)  # any order: the names say which is which


def named(*changes: tuple[int, StateTensor | None]) -> list[StateTensor]:
    tensors: list[StateTensor | None] = list(LAYOUT.split(np.arange(9, dtype=np.float32)))
    for index, tensor in changes:
        if index < len(tensors):
            tensors[index] = tensor
        else:
            tensors.append(tensor)
    return [t for t in tensors if t is not None]


@pytest.mark.parametrize(("tensors", "field"), [
    (named((0, StateTensor("lstm/0", (1, 3), np.zeros(3)))), "tensors[0].shape"),
    (named((2, StateTensor("gru/0", (2,), np.zeros(3)))), "tensors[2].values"),
    (named((3, StateTensor("rnn/0", (1,), np.array([np.nan])))), "tensors[3].values"),
    (named((1, StateTensor("lstm/1", (3,), np.array([0, np.inf, 0])))), "tensors[1].values"),
    (named((1, StateTensor("lstm/2", (3,), np.zeros(3)))), "tensors[1].name"),
    (named((1, StateTensor("lstm/0", (3,), np.zeros(3)))), "tensors[1].name"),  # twice
    (named((4, StateTensor("dense/0", (1,), np.zeros(1)))), "tensors[4].name"),
    (named((3, None)), "tensors: rnn/0 missing"),
], ids=["batch axis", "value count", "NaN", "Inf", "misnamed", "twice", "extra", "missing"])
def test_a_state_that_is_not_the_models_is_refused_naming_the_field(tensors: list[StateTensor], field: str) -> None:
    with pytest.raises(ServiceError) as refused:
        LAYOUT.join(tensors)
    assert refused.value.code.name == "INVALID_ARGUMENT" and refused.value.message.startswith(field)


class _TwoStateRunner:
    """What the stream rules read of a model: its fingerprint (b"f" * 8) and a two-value zero state."""

    state_size = 2
    max_chunk_timesteps = 8
    description = ModelDescription("m", (b"f" * 8).hex(), input_features=1, output_size=1, per_timestep_outputs=True,
                                   state_size=2)

    def zero_states(self, batch: int) -> np.ndarray:
        return np.zeros((batch, 2), np.float32)


def test_the_record_of_a_set_starts_a_sequence_no_earlier_chunk_matches() -> None:
    rules = StreamRules(ModelVersions.of(_TwoStateRunner()), replay_window=4)
    before = Chunk("s", np.ones((3, 1), np.float32), start_offset=0, reset=True, request_id="r1")
    record = set_record(np.array([1.5, -2.0], np.float32), 40, b"f" * 8, now_ms=1)
    record = SlotRecord.decode(record.encode())  # what Redis holds: format 2, read by every release
    assert record.offset == 40 and record.encode()[10] == 2
    # The chunk that ran before the set, again: neither replayed nor taken for a late duplicate of this
    # sequence's start, but a reset that starts another sequence.
    planned = rules.plan(0, before, chunk_digest(before), record)
    assert isinstance(planned, Planned) and planned.base_offset == 0
    # The next chunk continues from the set state at its offset, with no answer of before kept.
    after = Chunk("s", np.ones((2, 1), np.float32), start_offset=40, request_id="r2")
    planned = rules.plan(0, after, chunk_digest(after), record)
    assert isinstance(planned, Planned) and planned.base_offset == 40 and len(planned.earlier) == 0
    np.testing.assert_array_equal(planned.base_state, [1.5, -2.0])
    stale = Chunk("s", np.ones((2, 1), np.float32), start_offset=3)
    refused = rules.plan(0, stale, chunk_digest(stale), record)
    assert isinstance(refused, ServiceError) and refused.current_offset == 40
