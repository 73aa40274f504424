"""Checks that turn untrusted request fields into a `Chunk`, or an INVALID_ARGUMENT naming the field.

Every protocol edge uses these, passing the field names its own protocol uses, so a bad request is
refused before it reaches the batcher and never changes any state.
"""

from __future__ import annotations

import re

import numpy as np

from server.errors import invalid_argument
from server.types import Chunk

MAX_STREAM_ID_LENGTH = 128
# Printable ASCII without space; no braces, because the id sits inside a Redis Cluster hash tag.
_FORBIDDEN_ID_CHARS = frozenset("{}")
_VALID_ID = re.compile(rf"[!-z|~]{{1,{MAX_STREAM_ID_LENGTH}}}")  # 0x21-0x7E without { (0x7B) and } (0x7D)


def check_stream_id(stream_id: str, field: str = "stream_id") -> str:
    if _VALID_ID.fullmatch(stream_id):  # the common case, in one C call; the rest explains what is wrong
        return stream_id
    if not stream_id:
        raise invalid_argument(field, "must not be empty")
    if len(stream_id) > MAX_STREAM_ID_LENGTH:
        raise invalid_argument(
            field, f"is {len(stream_id)} characters long; at most {MAX_STREAM_ID_LENGTH} are allowed"
        )
    for position, char in enumerate(stream_id):
        if not ("!" <= char <= "~") or char in _FORBIDDEN_ID_CHARS:
            raise invalid_argument(
                field,
                f"character {char!r} at position {position} is not allowed; use printable ASCII "
                "without spaces or braces",
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
) -> np.ndarray:
    """Return `values` as a contiguous float32 [timesteps, features] array, or raise."""
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
) -> Chunk:
    """Validate native-API fields into a Chunk (other protocols call the check_* pieces directly)."""
    if stream_id is not None:
        check_stream_id(stream_id)
    check_start(start_offset, reset)
    if len(request_id) > 256:
        raise invalid_argument("request_id", f"is {len(request_id)} characters long; at most 256")
    array = check_values(values, timesteps, features, max_timesteps)
    return Chunk(stream_id, array, start_offset, reset, end, request_id, tenant=tenant)
