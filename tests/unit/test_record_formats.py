"""Every slot record format this release reads is read back exactly (issue 29; server/state/record.py).

The bytes are built by hand, field by field, from the layout table atop server/state/record.py, not with
encode(): a change to the layout that encode() and decode() make together still fails here. encode()
writes format 2 while a record keeps no earlier answers (what 0.1.0 reads), format 3 with them, and format 4
when it keeps input history (--history-timesteps); a record of a newer format is recognised as newer
(answered UNAVAILABLE by the server), not as corrupt.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from server.state.record import NEWEST_FORMAT, READ_FORMATS, CorruptRecord, KeptAnswer, NewerRecord, SlotRecord

VERSION = bytes(range(1, 9))
FINGERPRINT = b"\xe0\xec\xb8\x64\x86\x9b\x80\xab"
STATE = np.arange(6, dtype=np.float32) / 7
OUTPUTS = np.array([[0.5], [-1.25], [3.0]], dtype=np.float32)  # 3 rows, 1 column
RECENT = b"r" * 8 + b"s" * 8
EARLIER = ((10, b"e" * 16, b"i" * 8, np.array([[1.5], [2.5]], dtype=np.float32)),
           (12, b"f" * 16, bytes(8), np.array([[-4.0]], dtype=np.float32)))
HISTORY = np.array([[0.25, 1.0], [2.0, -3.5], [4.0, 8.5]], dtype=np.float32)  # 3 timesteps, 2 features
HISTORY_START = 12


def u(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little", signed=False)


def floats(values: np.ndarray) -> bytes:
    return values.astype("<f4").tobytes()


def record_bytes(fmt: int, *, ended: bool = False) -> bytes:
    """A record of format `fmt` (1 to 4), from the documented table: offset 15, updated 1700000000123 ms,
    last chunk at 12 (digest b"d"*16, request id b"q"*8), STATE and OUTPUTS; formats 2 to 4 add the first
    chunk's digests and RECENT; formats 3 and 4 the EARLIER answers; format 4 the HISTORY from HISTORY_START."""
    head = (VERSION + b"LS" + u(fmt, 1) + u(1 if ended else 0, 1) + u(15, 8) + u(1_700_000_000_123, 8)
            + FINGERPRINT + u(12, 8) + b"d" * 16 + b"q" * 8 + u(STATE.size, 4) + u(3, 4) + u(1, 4))
    assert len(head) == 80
    if fmt == 1:
        return head + floats(STATE) + floats(OUTPUTS)
    head += b"a" * 16 + b"b" * 8 + u(len(RECENT) // 8, 4)
    assert len(head) == 108
    if fmt == 2:
        return head + floats(STATE) + floats(OUTPUTS) + RECENT
    head += u(len(EARLIER), 4)
    assert len(head) == 112
    answers = b"".join(u(start, 8) + digest + request_id + u(out.shape[0], 4) + u(out.shape[1], 4) + floats(out)
                       for start, digest, request_id, out in EARLIER)
    if fmt == 3:
        return head + floats(STATE) + floats(OUTPUTS) + RECENT + answers
    head += u(HISTORY.shape[0], 4) + u(HISTORY.shape[1], 4) + u(HISTORY_START, 8)
    assert len(head) == 128
    return head + floats(STATE) + floats(OUTPUTS) + RECENT + answers + floats(HISTORY)


def assert_common(record: SlotRecord) -> None:
    assert record.version == VERSION and record.offset == 15 and record.updated_unix_ms == 1_700_000_000_123
    assert record.fingerprint == FINGERPRINT and record.last_start == 12
    assert record.last_digest == b"d" * 16 and record.last_request_id == b"q" * 8
    assert record.state.dtype == np.float32 and np.array_equal(record.state, STATE)
    assert np.array_equal(record.last_outputs, OUTPUTS) and record.last_outputs.shape == (3, 1)


def test_this_release_reads_formats_1_to_4() -> None:
    assert READ_FORMATS == (1, 2, 3, 4) and NEWEST_FORMAT == 4


def test_format_1_is_read_exactly() -> None:
    record = SlotRecord.decode(record_bytes(1))
    assert_common(record)
    assert not record.ended and record.first_digest == bytes(16) and record.first_request_id == bytes(8)
    assert record.recent_requests == b"" and not record.earlier


@pytest.mark.parametrize("ended", [False, True])
def test_format_2_is_read_exactly(ended: bool) -> None:
    record = SlotRecord.decode(record_bytes(2, ended=ended))
    assert_common(record)
    assert record.ended is ended
    assert record.first_digest == b"a" * 16 and record.first_request_id == b"b" * 8
    assert record.recent_requests == RECENT and not record.earlier


def test_format_3_is_read_exactly_with_its_earlier_answers() -> None:
    record = SlotRecord.decode(record_bytes(3))
    assert_common(record)
    assert record.first_digest == b"a" * 16 and record.recent_requests == RECENT
    assert len(record.earlier) == len(EARLIER)
    for answer, (start, digest, request_id, outputs) in zip(record.earlier, EARLIER, strict=True):
        assert (answer.start, answer.digest, answer.request_id) == (start, digest, request_id)
        assert np.array_equal(answer.outputs, outputs) and answer.outputs.shape == outputs.shape


def test_format_4_is_read_exactly_with_its_input_history() -> None:
    record = SlotRecord.decode(record_bytes(4))
    assert_common(record)
    assert len(record.earlier) == len(EARLIER) and record.recent_requests == RECENT
    assert (record.history_start, record.history_rows, record.history_columns) == (HISTORY_START, 3, 2)
    assert np.array_equal(record.history_inputs(), HISTORY)


@pytest.mark.parametrize("fmt", [1, 2, 3, 4])
def test_a_record_one_byte_short_or_long_is_corrupt(fmt: int) -> None:
    data = record_bytes(fmt)
    for wrong in (data[:-1], data + b"\0"):
        with pytest.raises(CorruptRecord):
            SlotRecord.decode(wrong)


def test_encode_writes_format_2_without_earlier_answers_and_format_3_with_them() -> None:
    two = SlotRecord.decode(record_bytes(2))
    assert two.encode() == record_bytes(2)  # byte for byte: what 0.1.0 reads
    three = SlotRecord.decode(record_bytes(3))
    assert three.encode() == record_bytes(3)
    one = SlotRecord.decode(record_bytes(1))
    assert one.encode()[10] == 2  # an old record is written back in the format 0.1.0 reads too
    kept = tuple(KeptAnswer.of(*answer) for answer in EARLIER)
    assert replace(two, earlier=kept).encode() == record_bytes(3)  # the same record, with earlier answers
    assert replace(three, earlier=()).encode() == record_bytes(2)
    four = SlotRecord.decode(record_bytes(4))
    assert four.encode() == record_bytes(4)
    assert replace(three, history=floats(HISTORY), history_columns=2, history_start=HISTORY_START).encode() \
        == record_bytes(4)
    assert replace(four, history=b"", history_columns=0, history_start=0).encode() == record_bytes(3)


def test_a_newer_format_is_recognised_as_newer_not_as_corrupt() -> None:
    data = bytearray(record_bytes(4))
    data[10] = 5
    with pytest.raises(NewerRecord) as raised:
        SlotRecord.decode(bytes(data))
    assert raised.value.format == 5 and raised.value.version == VERSION
    data[8:10] = b"XX"  # not a record at all: corrupt, not newer
    with pytest.raises(CorruptRecord) as raised_corrupt:
        SlotRecord.decode(bytes(data))
    assert not isinstance(raised_corrupt.value, NewerRecord)
