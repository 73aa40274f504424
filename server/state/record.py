"""The binary record of one stream's slot, and the only code that knows its layout.

Format 4 is format 3 followed by the stream's recent inputs (`--history-timesteps`, docs/models.md): written
only by a record that keeps some, and only once the deployment allows it (server/state/formats.py). Its
header has three more fields after format 3's:

    112     4     history rows: the timesteps kept (uint32)
    116     4     history columns: the model's input features (uint32)
    120     8     offset of the first kept timestep (uint64; 0: the history covers the whole sequence)
    128     ...   format 3's body, then the history float32[rows * columns]

Format 3 (written since the answers of the last chunks are kept for retries, invariant 11 in
docs/invariants.md; format 2 while only the last answer is kept, so that a server of the previous
release reads every record written with `--replay-window 1`):

    offset  size  field
    0       8     version: a random token, new on every write; the compare-and-set compares it, and a
                  save whose answer was lost is resolved by looking for it (invariant 9)
    8       2     magic b"LS"
    10      1     format (3)
    11      1     flags: bit 0 = the sequence ended (state dropped, record kept only to answer retries)
    12      8     offset: timesteps consumed since the last reset (uint64)
    20      8     updated_unix_ms (int64)
    28      8     model fingerprint (8 bytes of the hex digest)
    36      8     start offset of the last applied chunk (uint64)
    44      16    digest of the last applied chunk's data (values, reset, end)
    60      8     digest of the last applied chunk's request_id (zeros when it had none)
    68      4     state length in float32 values (uint32)
    72      4     rows of the last response's outputs (uint32)
    76      4     columns of the last response's outputs (uint32)
    80      16    digest of the data of the chunk that started the current sequence
    96      8     digest of that chunk's request_id (zeros when it had none)
    104     4     number of recent request digests that follow the outputs (uint32, at most RECENT_REQUESTS)
    108     4     number of earlier answers that follow the request digests (uint32; format 3 only)
    112     ...   state float32[state length], then last outputs float32[rows * columns], then the recent
                  request digests, 8 bytes each, oldest first, then the earlier answers, oldest first:
                  each its chunk's start offset (uint64), data digest (16), request_id digest (8), rows and
                  columns (uint32 each), then its outputs float32[rows * columns]

Format 2 is format 3 without the count at 108 and without earlier answers (its header is 108 bytes);
format 1 is format 2 without the bytes from 80 to 108 and without recent request digests. Both are
still read (an upgraded server keeps every stream), and written back in the current format on the
stream's next chunk.

All little-endian. Keeping the last responses lets a retry be answered identically without running
the model again or advancing the state twice; keeping the chunk that started the sequence and the
recent request ids lets a late copy of an earlier chunk be recognised and refused.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, overload

import numpy as np

_HEADER_1 = struct.Struct("<8s2sBBQq8sQ16s8sIII")
_HEADER_2 = struct.Struct("<8s2sBBQq8sQ16s8sIII16s8sI")
_HEADER = struct.Struct("<8s2sBBQq8sQ16s8sIII16s8sII")
_HEADER_4 = struct.Struct("<8s2sBBQq8sQ16s8sIII16s8sIIIIQ")
_ANSWER = struct.Struct("<Q16s8sII")  # an earlier answer's start offset, digests, rows and columns
_FLOAT32 = np.dtype("<f4")
HEADER_SIZE = _HEADER.size
MAGIC = b"LS"
_FORMAT = 3
_FORMAT_WITH_HISTORY = 4
# The newest format whose readers need not know about earlier answers: written while a record keeps none.
_FORMAT_WITHOUT_EARLIER = 2
# What this release reads and writes (`lstm-serve --version`; server/state/formats.py, rolling upgrades).
READ_FORMATS = (1, 2, 3, 4)
NEWEST_FORMAT = _FORMAT_WITH_HISTORY
# The oldest format that carries earlier answers, and the one that carries input history.
EARLIER_ANSWERS_FORMAT = _FORMAT
HISTORY_FORMAT = _FORMAT_WITH_HISTORY
# The newest format the previous release (0.1.0) reads: a deployment upgraded from it writes this until
# the operator allows the newest (docs/deploy.md, "Rolling upgrades").
PREVIOUS_RELEASE_FORMAT = _FORMAT_WITHOUT_EARLIER
FLAG_ENDED = 1
# Where the flags byte sits: the reset script (server/state/scripts.py) reads it without decoding a record.
FLAGS_OFFSET = 11
VERSION_SIZE = 8
REQUEST_DIGEST_SIZE = 8
# Request digests of the current sequence kept to recognise late duplicates of append-mode chunks
# (invariant 10): 16 x 8 bytes beside about 1 KiB of state on the default model.
RECENT_REQUESTS = 16


# What a decoded record holds in memory beyond its encoding's bytes: the record, its arrays' and bytes objects'
# headers, KeptAnswers (646 bytes measured with tracemalloc on CPython 3.11; independent of the model's size).
DECODED_OVERHEAD_BYTES = 660


class CorruptRecord(ValueError):
    """The bytes under a slot key are not a record of this format."""

    def __init__(self, message: str, version: bytes = b"") -> None:
        super().__init__(message)
        # The key's first bytes, so a reset can still compare-and-set over the unreadable record.
        self.version = version


class NewerRecord(CorruptRecord):
    """A record in a format newer than this release reads: written by a newer replica during a rolling
    upgrade (or after a rollback). Not lost: a replica of the newer release reads it."""

    def __init__(self, found: int, version: bytes) -> None:
        super().__init__(f"record format {found}, newer than this release reads (up to {NEWEST_FORMAT})", version)
        self.format = found


# Versions only need to differ (a writer's compare-and-set must not match another writer's token), not
# to be unpredictable: a generator seeded once from the OS draws them without a getrandom() system call
# per chunk (os.urandom measured 2-3 % of the event loop's time under load). Reseeded in a forked child.
_versions = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _versions.seed(os.urandom(32)))


def new_version() -> bytes:
    return _versions.getrandbits(8 * VERSION_SIZE).to_bytes(VERSION_SIZE, "little")


class KeptAnswer(NamedTuple):
    """The answer of an applied chunk before the last one, kept for its retries (--replay-window).

    The outputs stay the record's bytes until a retry asks for them (a named tuple: cheap to build)."""

    start: int  # the chunk's start offset
    digest: bytes  # of its data
    request_id: bytes  # digest of its request_id (zeros when it had none)
    rows: int
    columns: int
    data: bytes  # the outputs, float32 little-endian, rows x columns

    @classmethod
    def of(cls, start: int, digest: bytes, request_id: bytes, outputs: np.ndarray) -> KeptAnswer:
        rows, columns = outputs.shape
        return cls(start, digest, request_id, rows, columns, outputs.astype("<f4", copy=False).tobytes())

    @property
    def outputs(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype="<f4").reshape(self.rows, self.columns)

    @property
    def size(self) -> int:
        """Its bytes in a record."""
        return _ANSWER.size + len(self.data)

    def encode(self) -> bytes:
        return _ANSWER.pack(self.start, self.digest, self.request_id, self.rows, self.columns) + self.data


# Where an answer's rows and columns sit in its bytes: enough to know its size without decoding it.
_ANSWER_SHAPE = struct.Struct("<II")
_ANSWER_SHAPE_AT = _ANSWER.size - _ANSWER_SHAPE.size


class KeptAnswers(Sequence[KeptAnswer]):
    """A record's earlier answers, oldest first, kept as the record's bytes.

    Every chunk carries the window over into its stream's next record (the oldest answer dropped, the last
    one added) and only a retry reads an answer, so the bytes are copied along whole and an answer is decoded
    only when asked for: per chunk that is one slice and one join, not a tuple per answer."""

    __slots__ = ("_count", "raw")

    def __init__(self, raw: bytes = b"", count: int = 0) -> None:
        self.raw = raw
        self._count = count

    @classmethod
    def of(cls, answers: Iterable[KeptAnswer]) -> KeptAnswers:
        answers = list(answers)
        return cls(b"".join(answer.encode() for answer in answers), len(answers))

    @classmethod
    def read(cls, data: bytes, at: int, count: int, version: bytes) -> tuple[KeptAnswers, int]:
        """`count` answers from `at` in a record, and where they end (each answer's size read, none decoded)."""
        end = at
        for _ in range(count):
            if len(data) < end + _ANSWER.size:
                raise CorruptRecord("record length does not match its header", version)
            rows, columns = _ANSWER_SHAPE.unpack_from(data, end + _ANSWER_SHAPE_AT)
            end += _ANSWER.size + 4 * rows * columns
        if len(data) < end:
            raise CorruptRecord("record length does not match its header", version)
        return cls(bytes(data[at:end]), count), end

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[KeptAnswer]:
        raw, at = self.raw, 0
        for _ in range(self._count):
            start, digest, request_id, rows, columns = _ANSWER.unpack_from(raw, at)
            end = at + _ANSWER.size + 4 * rows * columns
            yield KeptAnswer(start, digest, request_id, rows, columns, raw[at + _ANSWER.size:end])
            at = end

    @overload
    def __getitem__(self, index: int) -> KeptAnswer: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[KeptAnswer, ...]: ...

    def __getitem__(self, index: int | slice) -> KeptAnswer | tuple[KeptAnswer, ...]:
        return tuple(self)[index]

    def __reversed__(self) -> Iterator[KeptAnswer]:
        return reversed(tuple(self))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeptAnswers):
            return NotImplemented
        return self.raw == other.raw and self._count == other._count

    def __hash__(self) -> int:
        return hash((self.raw, self._count))

    def __repr__(self) -> str:
        return f"KeptAnswers({list(self)!r})"

    @property
    def size(self) -> int:
        """Their bytes in a record."""
        return len(self.raw)

    def with_answer(self, start: int, digest: bytes, request_id: bytes, outputs: np.ndarray) -> KeptAnswers:
        """These answers and one more after them (its bytes as KeptAnswer.encode writes them), without building
        a KeptAnswer: once per chunk that continues a stream."""
        rows, columns = outputs.shape
        if outputs.dtype != _FLOAT32:
            outputs = outputs.astype(_FLOAT32)
        return KeptAnswers(b"".join((self.raw, _ANSWER.pack(start, digest, request_id, rows, columns),
                                     outputs.tobytes())), self._count + 1)

    def newest(self, count: int, max_bytes: int) -> KeptAnswers:
        """The newest answers: at most `count`, and at most `max_bytes` of them (the oldest dropped first)."""
        raw, kept = self.raw, self._count
        at = 0
        while kept and (kept > count or len(raw) - at > max_bytes):
            rows, columns = _ANSWER_SHAPE.unpack_from(raw, at + _ANSWER_SHAPE_AT)
            at += _ANSWER.size + 4 * rows * columns
            kept -= 1
        return self if at == 0 else KeptAnswers(raw[at:], kept)


NO_EARLIER = KeptAnswers()


# Not frozen, though never changed once built: one is decoded and one built per chunk, and a frozen dataclass's
# __init__ costs about four times as much (server/types.py, Chunk).
@dataclass(slots=True)
class SlotRecord:
    version: bytes
    offset: int
    updated_unix_ms: int
    fingerprint: bytes
    last_start: int
    last_digest: bytes
    last_request_id: bytes
    state: np.ndarray  # float32 [state_size]; empty when ended
    last_outputs: np.ndarray  # float32 [rows, output_size]
    ended: bool = False
    # The chunk that started the current sequence (zeros when unknown: a record of format 1).
    first_digest: bytes = bytes(16)
    first_request_id: bytes = bytes(REQUEST_DIGEST_SIZE)
    # request_digest() (server/dataplane/rules.py) of the sequence's last RECENT_REQUESTS chunks that carried a
    # request_id.
    recent_requests: bytes = b""
    # The answers of the applied chunks before the last one, oldest first (--replay-window - 1 at most).
    earlier: KeptAnswers = NO_EARLIER
    # The sequence's last inputs (--history-timesteps): float32 little-endian [rows, history_columns], the first
    # of them at offset history_start. Empty: none kept.
    history: bytes = b""
    history_columns: int = 0
    history_start: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.earlier, KeptAnswers):  # a sequence of KeptAnswer, as tests and tools build them
            self.earlier = KeptAnswers.of(self.earlier)

    @property
    def history_rows(self) -> int:
        return len(self.history) // (4 * self.history_columns) if self.history_columns else 0

    def history_inputs(self) -> np.ndarray:
        """The kept inputs, float32 [rows, columns]."""
        return np.frombuffer(self.history, dtype="<f4").reshape(self.history_rows, self.history_columns)

    def encode(self) -> bytes:
        # Once per saved chunk: no astype unless needed, and the answers' count read directly.
        state, outputs = self.state, self.last_outputs
        if state.dtype != _FLOAT32:
            state = state.astype(_FLOAT32)
        if outputs.dtype != _FLOAT32:
            outputs = outputs.astype(_FLOAT32)
        rows, columns = outputs.shape
        earlier, history = self.earlier, self.history
        fmt = _FORMAT_WITH_HISTORY if history else _FORMAT if earlier._count else _FORMAT_WITHOUT_EARLIER
        fields = (
            self.version, MAGIC, fmt, FLAG_ENDED if self.ended else 0, self.offset, self.updated_unix_ms,
            self.fingerprint, self.last_start, self.last_digest, self.last_request_id, state.size, rows, columns,
            self.first_digest, self.first_request_id, len(self.recent_requests) // REQUEST_DIGEST_SIZE,
        )
        if history:
            header = _HEADER_4.pack(*fields, earlier._count, self.history_rows, self.history_columns,
                                    self.history_start)
        else:
            header = _HEADER.pack(*fields, earlier._count) if earlier._count else _HEADER_2.pack(*fields)
        return b"".join((header, state.tobytes(), outputs.tobytes(), self.recent_requests, earlier.raw, history))

    def has_recent_request(self, digest: bytes) -> bool:
        recent = self.recent_requests
        return any(recent[i:i + REQUEST_DIGEST_SIZE] == digest for i in range(0, len(recent), REQUEST_DIGEST_SIZE))

    @classmethod
    def decode(cls, data: bytes) -> SlotRecord:
        if len(data) < _HEADER_1.size:
            raise CorruptRecord(f"{len(data)} bytes is shorter than a record header", data[:VERSION_SIZE])
        fmt = data[10] if data[8:10] == MAGIC else None
        earlier_count = history_rows = history_columns = history_start = 0
        if fmt == 1:
            (version, _, _, flags, offset, updated, fingerprint, last_start, last_digest,
             last_request_id, state_len, rows, columns) = _HEADER_1.unpack_from(data)
            first_digest, first_request_id, recent_count, body_at = bytes(16), bytes(8), 0, _HEADER_1.size
        elif fmt == 2 and len(data) >= _HEADER_2.size:
            (version, _, _, flags, offset, updated, fingerprint, last_start, last_digest, last_request_id,
             state_len, rows, columns, first_digest, first_request_id, recent_count) = _HEADER_2.unpack_from(data)
            body_at = _HEADER_2.size
        elif fmt == _FORMAT and len(data) >= HEADER_SIZE:
            (version, _, _, flags, offset, updated, fingerprint, last_start, last_digest, last_request_id,
             state_len, rows, columns, first_digest, first_request_id, recent_count,
             earlier_count) = _HEADER.unpack_from(data)
            body_at = HEADER_SIZE
        elif fmt == _FORMAT_WITH_HISTORY and len(data) >= _HEADER_4.size:
            (version, _, _, flags, offset, updated, fingerprint, last_start, last_digest, last_request_id,
             state_len, rows, columns, first_digest, first_request_id, recent_count,
             earlier_count, history_rows, history_columns, history_start) = _HEADER_4.unpack_from(data)
            body_at = _HEADER_4.size
        elif fmt is not None and fmt > _FORMAT_WITH_HISTORY:
            raise NewerRecord(fmt, data[:VERSION_SIZE])
        else:
            raise CorruptRecord("not a slot record of format 1, 2, 3 or 4", data[:VERSION_SIZE])
        floats = state_len + rows * columns
        recent_at = body_at + 4 * floats
        earlier_at = recent_at + REQUEST_DIGEST_SIZE * recent_count
        if len(data) < earlier_at:
            raise CorruptRecord("record length does not match its header", version)
        earlier, end = KeptAnswers.read(data, earlier_at, earlier_count, version)
        history_end = end + 4 * history_rows * history_columns
        if len(data) != history_end:
            raise CorruptRecord("record length does not match its header", version)
        body = np.frombuffer(data, dtype="<f4", offset=body_at, count=floats)
        return cls(
            version=version, offset=offset, updated_unix_ms=updated, fingerprint=fingerprint,
            last_start=last_start, last_digest=last_digest, last_request_id=last_request_id,
            state=body[:state_len], last_outputs=body[state_len:].reshape(rows, columns),
            ended=bool(flags & FLAG_ENDED), first_digest=first_digest, first_request_id=first_request_id,
            recent_requests=bytes(data[recent_at:earlier_at]), earlier=earlier,
            history=bytes(data[end:history_end]), history_columns=history_columns if history_rows else 0,
            history_start=history_start,
        )


def fingerprint_bytes(fingerprint_hex: str) -> bytes:
    return bytes.fromhex(fingerprint_hex)[:8].ljust(8, b"\0")
