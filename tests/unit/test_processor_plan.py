"""Each branch of the processor's per-chunk plan (server/dataplane/processor.py), in process and in milliseconds.

The processor's collaborators are faked the way tests/unit/test_batcher.py fakes the batcher's: a store that
keeps records in a dict with the same compare-and-set answers as Redis, a model whose state is the sum
of its inputs (so an answer shows which state a chunk started from), and a tenant live-stream count.
The rules are docs/invariants.md's 3, 4, 7, 9 and 10; tests/redis/test_processor_rules.py runs the processor
against a real Redis, and the end-to-end tests run it behind gRPC.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import grpc
import numpy as np
import pytest

from lstm_stream.wire import OFFSET_METADATA_KEY
from server.config import ServerConfig
from server.dataplane.processor import BatchProcessor, StreamPolicy
from server.dataplane.versions import ModelVersions
from server.errors import ServiceError
from server.state.live import Change, LiveChange
from server.state.record import CorruptRecord, SlotRecord
from server.state.store import APPLIED, REFUSED, WrongType
from server.types import CONFLICT, Chunk, ModelDescription, Prediction

pytestmark = pytest.mark.timeout(30)

FINGERPRINT = "ab" * 8
STATE_TTL_MS, ENDED_TTL_MS = 60_000, 5_000


class SummingRunner:
    """A one-feature model whose state is the running sum of its inputs and whose output at each
    timestep is that sum: an answer shows the state its chunk started from."""

    state_size = 1

    def __init__(self, fingerprint: str = FINGERPRINT) -> None:
        self.description = ModelDescription("sum", fingerprint, input_features=1, output_size=1,
                                            per_timestep_outputs=True, state_size=1)
        self.batches: list[int] = []  # chunks per model call

    def zero_states(self, batch: int) -> np.ndarray:
        return np.zeros((batch, 1), np.float32)

    def run(self, inputs: list[np.ndarray], states: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        self.batches.append(len(inputs))
        outputs, new_states = [], states.copy()
        for row, values in enumerate(inputs):
            sums = states[row, 0] + np.cumsum(values[:, 0])
            outputs.append(sums.reshape(-1, 1).astype(np.float32))
            new_states[row, 0] = sums[-1]
        return outputs, new_states


DEFAULTS = ServerConfig()


class DictStore:
    """The StateStore calls the processor makes, over a dict keyed by (tenant, stream id). A save is a
    compare-and-set on the record's version, as the Redis script does; `answers` overrides a stream's
    next save result (REFUSED, or a ServiceError of that stream)."""

    def __init__(self) -> None:
        self.slots: dict[tuple[str, str], SlotRecord | CorruptRecord | WrongType] = {}
        self.writes: list[Any] = []  # every SlotWrite, applied or not
        self.deadlines: list[float] = []
        self.answers: dict[str, object] = {}
        self.waits_for_replicas = False
        self.unconfirmed: dict[str, ServiceError] = {}  # with waits_for_replicas: confirm()'s errors
        self.confirmed: list[str] = []
        self.stale: dict[str, Any] = {}  # stream id -> what its next load reads instead (an old master's slot)

    saved_slots = None  # no memory of what it saved: every load reads the dict

    async def load(self, stream_ids: Sequence[str], deadline: float, tenants: Sequence[str]) -> list:
        self.deadlines.append(deadline)
        return [self.stale.pop(stream_id) if stream_id in self.stale else self.slots.get((tenant, stream_id))
                for stream_id, tenant in zip(stream_ids, tenants, strict=True)]

    async def load_recent(self, stream_ids: Sequence[str], deadline: float, tenants: Sequence[str],
                          usable: Sequence[bool]) -> tuple[list, list[bool]]:
        return await self.load(stream_ids, deadline, tenants), [False] * len(stream_ids)

    async def save(self, writes: Sequence, deadline: float) -> list:
        results = []
        for write in writes:
            self.writes.append(write)
            if write.stream_id in self.answers:
                results.append(self.answers.pop(write.stream_id))
                continue
            current = self.slots.get((write.tenant, write.stream_id))
            version = getattr(current, "version", b"")
            if version != write.expected_version:
                results.append(REFUSED)
                continue
            self.slots[(write.tenant, write.stream_id)] = write.record
            results.append(APPLIED)
        return results

    async def confirm(self, stream_ids: Sequence[str], versions: Sequence[bytes], deadline: float,
                      tenants: Sequence[str]) -> list:
        self.confirmed += stream_ids
        answers: list = []
        for stream_id, version, tenant in zip(stream_ids, versions, tenants, strict=True):
            current = getattr(self.slots.get((tenant, stream_id)), "version", b"")
            answers.append(REFUSED if current != version else self.unconfirmed.get(stream_id))
        return answers

    def record(self, stream_id: str, tenant: str = "") -> SlotRecord:
        slot = self.slots[(tenant, stream_id)]
        assert isinstance(slot, SlotRecord)
        return slot


class LiveCount:
    """LiveStreams' calls: each tenant may hold `limit` live streams; NEW past it is refused."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.live: dict[str, set[str]] = {}
        self.changes: list[LiveChange] = []

    def limit_of(self, tenant: str) -> int:
        return self.limit

    async def apply(self, changes: Sequence[LiveChange], now_ms: int, deadline: float) -> list[bool]:
        allowed = []
        for change in changes:
            self.changes.append(change)
            streams = self.live.setdefault(change.tenant, set())
            if change.change is Change.END:
                streams.discard(change.stream_id)
            elif change.change is Change.CONTINUE or len(streams) < self.limit:
                streams.add(change.stream_id)
            else:
                allowed.append(False)
                continue
            allowed.append(True)
        return allowed


class Harness:
    """One processor over the fakes; `one` and `batch` run it as the batcher would."""

    def __init__(self, *, reset_on_model_change: bool = False, live: LiveCount | None = None,
                 runner: SummingRunner | None = None, replay_window: int = DEFAULTS.replay_window,
                 replay_window_bytes: int = DEFAULTS.replay_window_bytes) -> None:
        self.runner = runner or SummingRunner()
        self.store = DictStore()
        policy = StreamPolicy(state_ttl_ms=STATE_TTL_MS, ended_ttl_ms=ENDED_TTL_MS,
                              on_retired="reset" if reset_on_model_change else "refuse", request_deadline_s=7.0,
                              replay_window=replay_window, replay_window_bytes=replay_window_bytes)
        self.processor = BatchProcessor(ModelVersions.of(self.runner), self.store, policy, live)  # type: ignore[arg-type]

    def batch(self, *chunks: Chunk) -> list[Any]:
        return asyncio.run(self.processor(chunks))

    def one(self, chunk: Chunk) -> Any:  # a Prediction, a ServiceError or CONFLICT
        (result,) = self.batch(chunk)
        return result

    def model_calls(self) -> int:
        return len(self.runner.batches)


@pytest.fixture
def harness() -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**options: Any) -> Harness:
        made.append(Harness(**options))
        return made[-1]

    yield make
    for each in made:
        each.processor.close()


def chunk(*values: float, stream: str | None = "s", **fields: Any) -> Chunk:
    """A one-feature chunk of stream "s" unless told otherwise."""
    return Chunk(stream, np.array(values, np.float32).reshape(-1, 1), **fields)


def sums(result: Prediction) -> list[float]:
    return result.outputs[:, 0].tolist()


def refused(result: object, code: grpc.StatusCode, *words: str) -> ServiceError:
    assert isinstance(result, ServiceError), result
    assert result.code == code, result
    for word in words:
        assert word in result.message, result.message
    return result


# --- a stream's first chunk ----------------------------------------------------------------------------


def test_a_new_stream_starts_from_zero_state_and_is_created(harness) -> None:
    h = harness()
    first = h.one(chunk(1, 2, start_offset=0, request_id="r1"))
    assert isinstance(first, Prediction) and not first.replayed
    assert sums(first) == [1, 3] and first.offset == 2 and first.request_id == "r1"
    (write,) = h.store.writes
    assert write.expected_version == b"" and write.ttl_ms == STATE_TTL_MS  # created: the key must not exist
    record = h.store.record("s")
    assert record.offset == 2 and record.last_start == 0 and not record.ended
    assert record.state.tolist() == [3]
    # Without a start offset, a new stream starts at 0 too.
    assert h.one(chunk(5, stream="t")).offset == 1


def test_a_new_stream_refuses_a_chunk_that_starts_past_0(harness) -> None:
    h = harness()
    error = refused(h.one(chunk(1, start_offset=3)), grpc.StatusCode.FAILED_PRECONDITION,
                    "'s' is at offset 0", "starts at offset 3", "resend from offset 0")
    assert error.current_offset == 0
    assert not h.store.writes and h.model_calls() == 0


def test_a_one_shot_chunk_runs_from_zero_and_saves_nothing(harness) -> None:
    h = harness()
    h.one(chunk(10, start_offset=0))
    result = h.one(chunk(1, 2, stream=None))
    assert isinstance(result, Prediction) and sums(result) == [1, 3] and result.offset == 2
    assert len(h.store.writes) == 1  # only the stream's chunk


# --- continuing ----------------------------------------------------------------------------------------


def test_a_chunk_at_the_streams_offset_continues_from_its_state(harness) -> None:
    h = harness()
    h.one(chunk(1, 2, start_offset=0))
    version = h.store.record("s").version
    second = h.one(chunk(10, start_offset=2))
    assert sums(second) == [13] and second.offset == 3
    assert h.store.writes[-1].expected_version == version  # compare-and-set over what was loaded
    assert h.store.record("s").last_start == 2


def test_a_chunk_without_an_offset_is_appended(harness) -> None:
    h = harness()
    h.one(chunk(1, 2))
    appended = h.one(chunk(4))
    assert sums(appended) == [7] and appended.offset == 3
    # The same data again without an offset or a request id is another chunk, not a retry.
    again = h.one(chunk(4))
    assert sums(again) == [11] and again.offset == 4 and not again.replayed


@pytest.mark.parametrize(("start", "why"), [(5, "it was not applied;"), (1, "its answer is no longer kept")])
def test_a_chunk_at_another_offset_is_refused_with_the_streams_offset(harness, start: int, why: str) -> None:
    h = harness()
    h.one(chunk(1, 2, start_offset=0))
    before = h.store.record("s")
    error = refused(h.one(chunk(9, start_offset=start)), grpc.StatusCode.FAILED_PRECONDITION,
                    "'s' is at offset 2", f"starts at offset {start}", why, "resend from offset 2")
    assert error.current_offset == 2
    assert dict(error.trailing_metadata())[OFFSET_METADATA_KEY] == "2"
    assert h.store.record("s") is before and h.model_calls() == 1


def test_the_offset_travels_in_the_documented_metadata(harness) -> None:
    # README's error table and docs/invariants.md name it; clients of any language read it.
    h = harness()
    h.one(chunk(1, start_offset=0))
    assert ("x-stream-offset", "1") in h.one(chunk(1, start_offset=4)).trailing_metadata()


# --- retries of the last chunk -------------------------------------------------------------------------


def test_a_retry_with_the_same_start_offset_is_replayed_without_running(harness) -> None:
    h = harness()
    h.one(chunk(1, start_offset=0))
    first = h.one(chunk(2, 3, start_offset=1))
    retry = h.one(chunk(2, 3, start_offset=1, request_id="other"))
    assert isinstance(retry, Prediction) and retry.replayed
    assert sums(retry) == sums(first) == [3, 6] and retry.offset == 3 and retry.request_id == "other"
    assert h.model_calls() == 2 and len(h.store.writes) == 2  # neither run nor saved again
    # Same data at the new offset is a new chunk; other data at the old offset is refused.
    assert not h.one(chunk(2, 3, start_offset=3)).replayed
    refused(h.one(chunk(7, 7, start_offset=3)), grpc.StatusCode.FAILED_PRECONDITION, "is at offset 5")


def test_a_retry_with_the_same_request_id_is_replayed(harness) -> None:
    h = harness()
    h.one(chunk(1, request_id="a"))
    first = h.one(chunk(2, request_id="b"))
    retry = h.one(chunk(2, request_id="b"))
    assert retry.replayed and sums(retry) == sums(first) == [3] and retry.offset == 2
    # A new request id with the same data is a new chunk.
    assert h.one(chunk(2, request_id="c")).offset == 3


@pytest.mark.parametrize("request_id", ["", "restart-1"])
def test_a_retried_reset_is_replayed_and_a_second_reset_restarts(harness, request_id: str) -> None:
    h = harness()
    h.one(chunk(50, start_offset=0))
    first = h.one(chunk(1, 2, reset=True, request_id=request_id))
    retry = h.one(chunk(1, 2, reset=True, request_id=request_id))
    assert retry.replayed and sums(retry) == sums(first) == [1, 3] and h.model_calls() == 2
    # The same data with another request id is a second restart, on purpose.
    again = h.one(chunk(1, 2, reset=True, request_id="restart-2"))
    assert not again.replayed and sums(again) == [1, 3] and h.model_calls() == 3


# --- reset and end -------------------------------------------------------------------------------------


def test_reset_starts_over_from_zero_state_at_offset_0(harness) -> None:
    h = harness()
    h.one(chunk(100, 100, start_offset=0))
    version = h.store.record("s").version
    restarted = h.one(chunk(1, reset=True, start_offset=0))
    assert sums(restarted) == [1] and restarted.offset == 1
    assert h.store.writes[-1].expected_version == version  # replaces the old record, compare-and-set
    assert h.one(chunk(2, start_offset=1)).offset == 2


def test_end_drops_the_state_and_keeps_the_answer_for_retries(harness) -> None:
    h = harness()
    h.one(chunk(1, start_offset=0))
    last = h.one(chunk(2, start_offset=1, end=True))
    assert sums(last) == [3] and last.offset == 2
    record = h.store.record("s")
    assert record.ended and record.state.size == 0 and h.store.writes[-1].ttl_ms == ENDED_TTL_MS
    retry = h.one(chunk(2, start_offset=1, end=True))
    assert retry.replayed and sums(retry) == [3]
    # After the end the stream starts again from zero, at offset 0.
    refused(h.one(chunk(5, start_offset=2)), grpc.StatusCode.FAILED_PRECONDITION, "is at offset 0")
    fresh = h.one(chunk(5))
    assert sums(fresh) == [5] and fresh.offset == 1


# --- late duplicates (invariant 10) --------------------------------------------------------------------


def test_a_late_copy_of_the_sequences_first_reset_is_refused(harness) -> None:
    h = harness(replay_window=1)  # its answer no longer kept (inside the window it is replayed: below)
    h.one(chunk(1, reset=True, request_id="start"))
    h.one(chunk(2, start_offset=1))
    error = refused(h.one(chunk(1, reset=True, request_id="start")), grpc.StatusCode.FAILED_PRECONDITION,
                    "late duplicate of the chunk that started the current sequence", "offset 2")
    assert error.current_offset == 2 and h.store.record("s").offset == 2
    # Another request id makes it a deliberate restart.
    assert h.one(chunk(1, reset=True, request_id="again")).offset == 1


def test_a_late_copy_of_a_recent_appended_chunk_is_refused(harness) -> None:
    h = harness(replay_window=1)
    h.one(chunk(1, request_id="a"))
    h.one(chunk(2, request_id="b"))
    error = refused(h.one(chunk(1, request_id="a")), grpc.StatusCode.FAILED_PRECONDITION,
                    "late duplicate of a recent chunk with request_id 'a'")
    assert error.current_offset == 2 and h.model_calls() == 2


def test_after_an_end_an_old_chunk_is_not_a_late_duplicate(harness) -> None:
    # The sequence is over: its first chunk again starts a new one.
    h = harness()
    h.one(chunk(1, reset=True, request_id="start"))
    h.one(chunk(2, request_id="b", end=True))
    again = h.one(chunk(1, reset=True, request_id="start"))
    assert isinstance(again, Prediction) and not again.replayed and again.offset == 1


# --- slots this processor must not continue ------------------------------------------------------------


def test_a_slot_of_another_model_is_refused_or_reset_when_configured(harness) -> None:
    for reset_on_model_change in (False, True):
        other = harness(runner=SummingRunner("cd" * 8))
        other.one(chunk(100, start_offset=0))
        h = harness(reset_on_model_change=reset_on_model_change)
        h.store.slots = other.store.slots
        result = h.one(chunk(1))
        if reset_on_model_change:
            assert isinstance(result, Prediction) and sums(result) == [1] and result.offset == 1
            # The answer says so: from another model (0), not from a version this process served.
            assert result.migration == "reset" and result.migrated_from == 0
        else:
            refused(result, grpc.StatusCode.FAILED_PRECONDITION, "saved by another model", "cdcdcdcdcdcdcdcd",
                    "--reset-on-model-change")
        # A reset starts it over either way.
        assert sums(h.one(chunk(3, reset=True))) == [3]


def test_an_unreadable_slot_is_data_loss_until_reset(harness) -> None:
    h = harness()
    h.store.slots[("", "s")] = CorruptRecord("not a slot record of format 1 or 2", b"12345678")
    refused(h.one(chunk(1)), grpc.StatusCode.DATA_LOSS, "'s' is unreadable", "not a slot record")
    restarted = h.one(chunk(1, reset=True))
    assert restarted.offset == 1 and h.store.writes[-1].expected_version == b"12345678"


def test_a_slot_with_a_state_of_another_size_is_data_loss(harness) -> None:
    h = harness()
    h.one(chunk(1, start_offset=0))
    h.store.slots[("", "s")] = replace(h.store.record("s"), state=np.zeros(3, np.float32))
    refused(h.one(chunk(1, start_offset=1)), grpc.StatusCode.DATA_LOSS,
            "the saved state has 3 values, the model needs 1")


def test_a_key_of_another_redis_type_is_refused_naming_it(harness) -> None:
    h = harness()
    h.store.slots[("", "s")] = WrongType("lstm:{s}", "hash")
    refused(h.one(chunk(1, reset=True)), grpc.StatusCode.FAILED_PRECONDITION, "'lstm:{s}' holds a hash")
    assert not h.store.writes


def test_a_chunk_that_must_continue_a_stream_needs_one(harness) -> None:
    # Triton's rule: a sequence begins with its START flag (reset).
    h = harness()
    error = refused(h.one(chunk(1, must_exist=True)), grpc.StatusCode.FAILED_PRECONDITION, "has no state")
    assert error.current_offset == 0
    assert h.one(chunk(1, must_exist=True, reset=True)).offset == 1
    assert h.one(chunk(2, must_exist=True, end=True)).offset == 2
    refused(h.one(chunk(3, must_exist=True)), grpc.StatusCode.FAILED_PRECONDITION, "has no state")  # ended


# --- batches -------------------------------------------------------------------------------------------


def test_a_batch_runs_its_streams_in_one_model_call_each_by_its_own_rules(harness) -> None:
    h = harness()
    h.one(chunk(1, stream="a", start_offset=0))
    h.runner.batches.clear()
    a, b, c, d = h.batch(chunk(2, stream="a", start_offset=1), chunk(5, stream="b"),
                         chunk(9, stream="c", start_offset=4), chunk(1, stream="d", reset=True))
    assert sums(a) == [3] and sums(b) == [5] and sums(d) == [1]
    refused(c, grpc.StatusCode.FAILED_PRECONDITION, "'c' is at offset 0")
    assert h.runner.batches == [3]


def test_a_save_that_lost_the_race_is_a_conflict_and_a_store_error_is_that_streams_alone(harness) -> None:
    h = harness()
    failure = ServiceError(grpc.StatusCode.UNAVAILABLE, "state store (Redis) unavailable: test")
    h.store.answers = {"raced": REFUSED, "failed": failure}
    raced, failed, fine = h.batch(chunk(1, stream="raced"), chunk(1, stream="failed"), chunk(1, stream="fine"))
    assert raced is CONFLICT and failed is failure and isinstance(fine, Prediction)


def test_the_two_tenants_of_one_stream_id_are_two_streams(harness) -> None:
    h = harness()
    h.one(chunk(100, tenant="t1"))
    other = h.one(chunk(1, tenant="t2"))
    assert sums(other) == [1] and h.store.record("s", "t2").offset == 1
    assert [w.tenant for w in h.store.writes] == ["t1", "t2"]


def test_redis_is_waited_for_until_the_latest_callers_deadline(harness) -> None:
    h = harness()
    soon, later = time.monotonic() + 3, time.monotonic() + 4
    h.batch(chunk(1, stream="a", deadline=soon), chunk(1, stream="b", deadline=later))
    assert h.store.deadlines[-1] == later
    # Without deadlines: --request-deadline-s from now (7 s in this harness).
    before = time.monotonic()
    h.one(chunk(1, stream="c"))
    assert before + 7 <= h.store.deadlines[-1] <= time.monotonic() + 7


def test_with_replicas_a_replay_is_answered_only_once_confirmed(harness) -> None:
    h = harness()
    h.one(chunk(1, start_offset=0, stream="kept"))
    h.one(chunk(1, start_offset=0, stream="short"))
    h.store.waits_for_replicas = True
    short = ServiceError(grpc.StatusCode.UNAVAILABLE, "only 0 of 1 replicas confirmed it")
    h.store.unconfirmed = {"short": short}
    kept, not_yet = h.batch(chunk(1, start_offset=0, stream="kept"), chunk(1, start_offset=0, stream="short"))
    assert kept.replayed and not_yet is short and h.store.confirmed == ["kept", "short"]


# --- live streams per tenant ---------------------------------------------------------------------------


def test_a_tenant_past_its_live_stream_limit_cannot_start_one(harness) -> None:
    live = LiveCount(limit=1)
    h = harness(live=live)
    assert h.one(chunk(1, stream="a", tenant="t")).offset == 1
    refused(h.one(chunk(1, stream="b", tenant="t")), grpc.StatusCode.RESOURCE_EXHAUSTED,
            "tenant 't' already has its limit of 1 live streams")
    assert ("t", "b") not in h.store.slots and h.model_calls() == 1
    # A live stream continues; ending it frees the place; chunks without a tenant are not counted.
    assert h.one(chunk(2, stream="a", tenant="t", end=True)).offset == 2
    assert h.one(chunk(1, stream="b", tenant="t")).offset == 1
    assert h.one(chunk(1, stream="free")).offset == 1
    assert [(c.stream_id, c.change) for c in live.changes] == [
        ("a", Change.NEW), ("b", Change.NEW), ("a", Change.END), ("b", Change.NEW)]
    assert h.one(chunk(3, stream="b", tenant="t")).offset == 2 and live.changes[-1].change is Change.CONTINUE


def test_with_replicas_a_refusal_is_answered_only_once_confirmed(harness) -> None:
    # Invariant 9 with WAIT: a node that cannot show its replicas hold the slot (an old master cut off by
    # a failover) may hold a stale one, so "the stream is at offset N" is not said from it.
    h = harness()
    h.one(chunk(1, start_offset=0))
    h.store.waits_for_replicas = True
    h.store.unconfirmed = {"s": ServiceError(grpc.StatusCode.UNAVAILABLE, "only 0 of 1 replicas confirmed")}
    assert h.one(chunk(2, start_offset=5)) is h.store.unconfirmed["s"]
    h.store.unconfirmed = {}
    refused(h.one(chunk(2, start_offset=5)), grpc.StatusCode.FAILED_PRECONDITION, "at offset 1")
    assert h.store.confirmed == ["s", "s"]


def test_with_replicas_an_answer_decided_on_a_stale_slot_is_decided_again(harness) -> None:
    # The read reached a node a chunk behind (a master since demoted, or one cut off): the refusal it
    # implies is not given; the chunk runs again (CONFLICT), and on the master's slot it continues.
    h = harness()
    h.one(chunk(1, start_offset=0))
    behind = h.store.record("s")
    h.one(chunk(2, start_offset=1))
    h.store.waits_for_replicas = True
    h.store.stale = {"s": behind}
    assert h.one(chunk(3, start_offset=2)) is CONFLICT
    assert sums(h.one(chunk(3, start_offset=2))) == [6] and h.store.record("s").offset == 3


# --- the replay window (invariant 11): the answers of the sequence's last chunks ----------------------------


def test_a_retry_of_any_chunk_in_the_window_is_replayed_and_changes_nothing(harness) -> None:
    h = harness(replay_window=4)
    answers = [h.one(chunk(float(n), float(n), start_offset=2 * n)) for n in range(6)]
    before, calls = h.store.record("s"), h.model_calls()
    for n in (2, 3, 4, 5):  # the last four, in any order
        retry = h.one(chunk(float(n), float(n), start_offset=2 * n))
        assert retry.replayed and retry.offset == 2 * n + 2 and sums(retry) == sums(answers[n])
    # Older than the window: refused, never applied again, and the message says why.
    error = refused(h.one(chunk(1.0, 1.0, start_offset=2)), grpc.StatusCode.FAILED_PRECONDITION,
                    "'s' is at offset 12", "its answer is no longer kept", "last 4 chunks", "--replay-window")
    assert error.current_offset == 12
    assert h.store.record("s") is before and h.model_calls() == calls


def test_retries_by_request_id_and_late_copies_inside_the_window_are_replayed(harness) -> None:
    h = harness(replay_window=3)
    first = h.one(chunk(1, reset=True, request_id="start"))
    h.one(chunk(2, request_id="b"))
    h.one(chunk(3, request_id="c"))
    calls = h.model_calls()
    again = h.one(chunk(1, reset=True, request_id="start"))  # the reset that started the sequence
    assert again.replayed and again.offset == 1 and sums(again) == sums(first)
    assert h.one(chunk(2, request_id="b")).replayed
    assert h.model_calls() == calls and h.store.record("s").offset == 3
    h.one(chunk(4, request_id="d"))  # now "start" is out of the window: the old rule refuses it
    refused(h.one(chunk(1, reset=True, request_id="start")), grpc.StatusCode.FAILED_PRECONDITION,
            "late duplicate of the chunk that started the current sequence")


def test_the_window_is_the_current_sequences(harness) -> None:
    # After a reset, a chunk that repeats an earlier sequence's data at the same offset is a new chunk.
    h = harness(replay_window=8)
    h.one(chunk(1, reset=True, start_offset=0))
    h.one(chunk(5, start_offset=1))
    h.one(chunk(1, reset=True, start_offset=0, request_id="new sequence"))
    repeated = h.one(chunk(5, start_offset=1))
    assert not repeated.replayed and repeated.offset == 2 and sums(repeated) == [6]


def test_the_window_is_bounded_by_its_bytes(harness) -> None:
    # Each answer here is 2 outputs (8 bytes) plus 40 bytes of its own header: 48 bytes each.
    h = harness(replay_window=16, replay_window_bytes=8 + 2 * 48)
    for n in range(6):
        h.one(chunk(float(n), float(n), start_offset=2 * n))
    assert len(h.store.record("s").earlier) == 2
    assert h.one(chunk(3.0, 3.0, start_offset=6)).replayed  # the last three answers are kept
    refused(h.one(chunk(2.0, 2.0, start_offset=4)), grpc.StatusCode.FAILED_PRECONDITION, "no longer kept")


def test_with_a_window_of_one_records_stay_in_the_previous_format(harness) -> None:
    h = harness(replay_window=1)
    for n in range(3):
        h.one(chunk(float(n), start_offset=n))
    record = h.store.record("s")
    assert not record.earlier and record.encode()[10] == 2
    wide = harness(replay_window=2)
    for n in range(3):
        wide.one(chunk(float(n), start_offset=n))
    assert len(wide.store.record("s").earlier) == 1 and wide.store.record("s").encode()[10] == 3
