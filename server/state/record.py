"""The binary record of one stream's slot, and the only code that knows its layout.

Format 2 (written since late duplicates are recognised, invariant 10 in docs/invariants.md):

    offset  size  field
    0       8     version: a random token, new on every write; the compare-and-set compares it, and a
                  save whose answer was lost is resolved by looking for it (invariant 9)
    8       2     magic b"LS"
    10      1     format (2)
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
    108     ...   state float32[state length], then last outputs float32[rows * columns], then the recent
                  request digests, 8 bytes each, oldest first

Format 1 is format 2 without the bytes from 80 to 108 and without recent request digests; it is still
read (an upgraded server keeps every stream), and written back as format 2 on the stream's next chunk.

All little-endian. Keeping the last response lets a retry be answered identically without running
the model again or advancing the state twice; keeping the chunk that started the sequence and the
recent request ids lets a late copy of an earlier chunk be recognised and refused.
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass

import numpy as np

_HEADER_1 = struct.Struct("<8s2sBBQq8sQ16s8sIII")
_HEADER = struct.Struct("<8s2sBBQq8sQ16s8sIII16s8sI")
HEADER_SIZE = _HEADER.size
MAGIC = b"LS"
_FORMAT = 2
FLAG_ENDED = 1
# Where the flags byte sits: the reset script (server/state/scripts.py) reads it without decoding a record.
FLAGS_OFFSET = 11
VERSION_SIZE = 8
REQUEST_DIGEST_SIZE = 8
# Request digests of the current sequence kept to recognise late duplicates of append-mode chunks
# (invariant 10): 16 x 8 bytes beside about 1 KiB of state on the default model.
RECENT_REQUESTS = 16


class CorruptRecord(ValueError):
    """The bytes under a slot key are not a record of this format."""

    def __init__(self, message: str, version: bytes = b"") -> None:
        super().__init__(message)
        # The key's first bytes, so a reset can still compare-and-set over the unreadable record.
        self.version = version


# Versions only need to differ (a writer's compare-and-set must not match another writer's token), not
# to be unpredictable: a generator seeded once from the OS draws them without a getrandom() system call
# per chunk (os.urandom measured 2-3 % of the event loop's time under load). Reseeded in a forked child.
_versions = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _versions.seed(os.urandom(32)))


def new_version() -> bytes:
    return _versions.getrandbits(8 * VERSION_SIZE).to_bytes(VERSION_SIZE, "little")


@dataclass(frozen=True, slots=True)
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

    def encode(self) -> bytes:
        rows, columns = self.last_outputs.shape
        header = _HEADER.pack(
            self.version, MAGIC, _FORMAT, FLAG_ENDED if self.ended else 0, self.offset,
            self.updated_unix_ms, self.fingerprint, self.last_start, self.last_digest,
            self.last_request_id, self.state.size, rows, columns, self.first_digest, self.first_request_id,
            len(self.recent_requests) // REQUEST_DIGEST_SIZE,
        )
        return b"".join((header, self.state.astype("<f4", copy=False).tobytes(),
                         self.last_outputs.astype("<f4", copy=False).tobytes(), self.recent_requests))

    def has_recent_request(self, digest: bytes) -> bool:
        recent = self.recent_requests
        return any(recent[i:i + REQUEST_DIGEST_SIZE] == digest for i in range(0, len(recent), REQUEST_DIGEST_SIZE))

    @classmethod
    def decode(cls, data: bytes) -> SlotRecord:
        if len(data) < _HEADER_1.size:
            raise CorruptRecord(f"{len(data)} bytes is shorter than a record header", data[:VERSION_SIZE])
        fmt = data[10] if data[8:10] == MAGIC else None
        if fmt == 1:
            (version, _, _, flags, offset, updated, fingerprint, last_start, last_digest,
             last_request_id, state_len, rows, columns) = _HEADER_1.unpack_from(data)
            first_digest, first_request_id, recent_count, body_at = bytes(16), bytes(8), 0, _HEADER_1.size
        elif fmt == _FORMAT and len(data) >= HEADER_SIZE:
            (version, _, _, flags, offset, updated, fingerprint, last_start, last_digest, last_request_id,
             state_len, rows, columns, first_digest, first_request_id, recent_count) = _HEADER.unpack_from(data)
            body_at = HEADER_SIZE
        else:
            raise CorruptRecord("not a slot record of format 1 or 2", data[:VERSION_SIZE])
        floats = state_len + rows * columns
        recent_at = body_at + 4 * floats
        if len(data) != recent_at + REQUEST_DIGEST_SIZE * recent_count:
            raise CorruptRecord("record length does not match its header", version)
        body = np.frombuffer(data, dtype="<f4", offset=body_at, count=floats)
        return cls(
            version=version, offset=offset, updated_unix_ms=updated, fingerprint=fingerprint,
            last_start=last_start, last_digest=last_digest, last_request_id=last_request_id,
            state=body[:state_len], last_outputs=body[state_len:].reshape(rows, columns),
            ended=bool(flags & FLAG_ENDED), first_digest=first_digest, first_request_id=first_request_id,
            recent_requests=bytes(data[recent_at:]),
        )


def fingerprint_bytes(fingerprint_hex: str) -> bytes:
    return bytes.fromhex(fingerprint_hex)[:8].ljust(8, b"\0")
