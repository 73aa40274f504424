"""The binary record of one stream's slot, and the only code that knows its layout.

    offset  size  field
    0       8     version: a random token, new on every write; the compare-and-set compares it
    8       2     magic b"LS"
    10      1     format (1)
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
    80      ...   state float32[state length], then last outputs float32[rows * columns]

All little-endian. Keeping the last response lets a retry be answered identically without running
the model again or advancing the state twice.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

import numpy as np

from server.types import Chunk

_HEADER = struct.Struct("<8s2sBBQq8sQ16s8sIII")
HEADER_SIZE = _HEADER.size
_MAGIC = b"LS"
_FORMAT = 1
_FLAG_ENDED = 1
VERSION_SIZE = 8


class CorruptRecord(ValueError):
    """The bytes under a slot key are not a record of this format."""

    def __init__(self, message: str, version: bytes = b"") -> None:
        super().__init__(message)
        # The key's first bytes, so a reset can still compare-and-set over the unreadable record.
        self.version = version


def chunk_digest(chunk: Chunk) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(bytes([chunk.reset, chunk.end]))
    digest.update(struct.pack("<II", *chunk.values.shape))
    digest.update(chunk.values.tobytes())
    return digest.digest()


def request_id_digest(request_id: str) -> bytes:
    if not request_id:
        return bytes(8)
    return hashlib.blake2b(request_id.encode(), digest_size=8).digest()


def new_version() -> bytes:
    return os.urandom(VERSION_SIZE)


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

    def encode(self) -> bytes:
        rows, columns = self.last_outputs.shape
        header = _HEADER.pack(
            self.version, _MAGIC, _FORMAT, _FLAG_ENDED if self.ended else 0, self.offset,
            self.updated_unix_ms, self.fingerprint, self.last_start, self.last_digest,
            self.last_request_id, self.state.size, rows, columns,
        )
        return b"".join((header, self.state.astype("<f4", copy=False).tobytes(),
                         self.last_outputs.astype("<f4", copy=False).tobytes()))

    @classmethod
    def decode(cls, data: bytes) -> SlotRecord:
        if len(data) < HEADER_SIZE:
            raise CorruptRecord(f"{len(data)} bytes is shorter than a record header", data[:VERSION_SIZE])
        (version, magic, fmt, flags, offset, updated, fingerprint, last_start, last_digest,
         last_request_id, state_len, rows, columns) = _HEADER.unpack_from(data)
        if magic != _MAGIC or fmt != _FORMAT:
            raise CorruptRecord("not a slot record of format 1", version)
        if len(data) != HEADER_SIZE + 4 * (state_len + rows * columns):
            raise CorruptRecord("record length does not match its header", version)
        body = np.frombuffer(data, dtype="<f4", offset=HEADER_SIZE)
        return cls(
            version=version, offset=offset, updated_unix_ms=updated, fingerprint=fingerprint,
            last_start=last_start, last_digest=last_digest, last_request_id=last_request_id,
            state=body[:state_len], last_outputs=body[state_len:].reshape(rows, columns),
            ended=bool(flags & _FLAG_ENDED),
        )


def fingerprint_bytes(fingerprint_hex: str) -> bytes:
    return bytes.fromhex(fingerprint_hex)[:8].ljust(8, b"\0")
