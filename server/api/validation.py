"""Checks that turn untrusted request fields into a `Chunk`, or an INVALID_ARGUMENT naming the field.

Every protocol edge uses these, passing the field names its own protocol uses, so a bad request is
refused before it reaches the batcher and never changes any state.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

from lstm_stream.wire import MAX_REQUEST_ID_CHARS, MAX_STREAM_ID_BYTES
from server.errors import invalid_argument
from server.types import Chunk

# Stream ids are UTF-8 text of 1 to MAX_STREAM_ID_BYTES bytes without control characters (Unicode category Cc),
# compared byte for byte: no normalisation, so "é" precomposed and "e" + combining accent are two
# streams. Braces and spaces are fine: Redis keys are binary-safe, and a brace inside the id only
# changes which cluster slot `<prefix>:{<id>}` hashes to, never the key's uniqueness. Format
# characters (Cf: zero-width joiner, bidi marks) are accepted: scripts such as Persian need them in
# names, and byte comparison keeps look-alike ids apart anyway.
# The common case (printable ASCII, where characters are bytes) is one C call; the rest is explained.
PLAIN_STREAM_ID = re.compile(rf"[ -~]{{1,{MAX_STREAM_ID_BYTES}}}")


def check_stream_id(stream_id: str, field: str = "stream_id") -> str:
    if PLAIN_STREAM_ID.fullmatch(stream_id):
        return stream_id
    if not stream_id:
        raise invalid_argument(field, "must not be empty")
    try:
        size = len(stream_id.encode("utf-8"))
    except UnicodeEncodeError as exc:  # a lone surrogate: not text a client could have sent as UTF-8
        raise invalid_argument(field, f"is not valid UTF-8 text (position {exc.start})") from None
    if size > MAX_STREAM_ID_BYTES:
        raise invalid_argument(
            field, f"is {size} bytes long in UTF-8; at most {MAX_STREAM_ID_BYTES} bytes are allowed"
        )
    for position, char in enumerate(stream_id):
        if unicodedata.category(char) == "Cc":
            raise invalid_argument(
                field,
                f"character U+{ord(char):04X} at position {position} is a control character; "
                "any UTF-8 text without control characters is allowed",
            )
    return stream_id


def check_values(
    values: np.ndarray,
    timesteps: int,
    features: int,
    max_timesteps: int,
    *,
    values_field: str = "values",
    timesteps_field: str = "timesteps",
    known_finite: bool = False,
) -> np.ndarray:
    """Return `values` as a contiguous float32 [timesteps, features] array, or raise. `known_finite`: the caller
    checked a larger array these values are part of (a PredictBatch message's block) in one pass."""
    if timesteps <= 0:
        raise invalid_argument(timesteps_field, f"must be at least 1 (got {timesteps})")
    if timesteps > max_timesteps:
        raise invalid_argument(
            timesteps_field, f"is {timesteps}; a chunk holds at most {max_timesteps} timesteps, split it"
        )
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    expected = timesteps * features
    if flat.size != expected:
        raise invalid_argument(
            values_field,
            f"has {flat.size} values; expected timesteps x features = {timesteps} x {features} = {expected}",
        )
    if known_finite:
        return flat.reshape(timesteps, features)  # a slice of a contiguous block: contiguous already
    finite = np.isfinite(flat)
    if not finite.all():
        index = int(np.argmin(finite))
        raise invalid_argument(
            values_field,
            f"value {index} (timestep {index // features}, feature {index % features}) is {flat[index]}; "
            "NaN and Inf are not accepted",
        )
    return np.ascontiguousarray(flat.reshape(timesteps, features))


def check_start(start_offset: int | None, reset: bool, field: str = "start_offset") -> None:
    if reset and start_offset not in (None, 0):
        raise invalid_argument(field, f"is {start_offset}, but reset starts a new sequence at offset 0")


def make_chunk(
    *,
    stream_id: str | None,
    values: np.ndarray,
    timesteps: int,
    features: int,
    max_timesteps: int,
    start_offset: int | None = None,
    reset: bool = False,
    end: bool = False,
    request_id: str = "",
    tenant: str = "",
    deadline: float | None = None,
    known_finite: bool = False,
    model: str = "",
    model_version: int = 0,
) -> Chunk:
    """Validate native-API fields into a Chunk (other protocols call the check_* pieces directly)."""
    if stream_id is not None:
        check_stream_id(stream_id)
    check_start(start_offset, reset)
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise invalid_argument("request_id", f"is {len(request_id)} characters long; at most {MAX_REQUEST_ID_CHARS}")
    array = check_values(values, timesteps, features, max_timesteps, known_finite=known_finite)
    return Chunk(stream_id, array, start_offset, reset, end, request_id, deadline=deadline, tenant=tenant,
                 model=model, model_version=model_version)
