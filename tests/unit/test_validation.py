"""Request validation in process (server/api/validation.py): every refusal is INVALID_ARGUMENT and starts with
the name of the field at fault, the name the caller's protocol uses; accepted input comes back as the
Chunk the data path expects. tests/serving/test_bad_input.py sends such requests through a running server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from server.api.validation import MAX_STREAM_ID_BYTES, check_start, check_stream_id, check_values, make_chunk
from server.errors import ServiceError

pytestmark = pytest.mark.timeout(30)


def refusal(call, *args, **kwargs) -> str:
    with pytest.raises(ServiceError) as raised:
        call(*args, **kwargs)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return raised.value.message


# --- stream ids ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream_id", [
    "x" * MAX_STREAM_ID_BYTES,  # the longest ASCII id
    "é" * (MAX_STREAM_ID_BYTES // 2),  # the longest, counted in UTF-8 bytes
    "a b {c}",  # spaces and braces: Redis keys are binary-safe
    "emoji 🌡️‍ zwj",  # format characters (Cf) are text
    "e\u0301",  # kept as sent: no normalisation
])
def test_stream_ids_of_utf8_text_are_accepted_as_sent(stream_id: str) -> None:
    assert check_stream_id(stream_id) is stream_id


@pytest.mark.parametrize(("stream_id", "problem"), [
    ("", "stream_id: must not be empty"),
    ("x" * (MAX_STREAM_ID_BYTES + 1), f"stream_id: is {MAX_STREAM_ID_BYTES + 1} bytes long in UTF-8; "
                                      f"at most {MAX_STREAM_ID_BYTES} bytes are allowed"),
    ("é" * (MAX_STREAM_ID_BYTES // 2 + 1), f"is {MAX_STREAM_ID_BYTES + 2} bytes long in UTF-8"),
    ("ab\ud800", "stream_id: is not valid UTF-8 text (position 2)"),
    ("a\x00b", "stream_id: character U+0000 at position 1 is a control character"),
    ("a\nb", "character U+000A at position 1"),
    ("\x7f", "character U+007F at position 0"),
    ("é\x85", "character U+0085 at position 1"),
])
def test_stream_ids_are_refused_saying_why(stream_id: str, problem: str) -> None:
    assert problem in refusal(check_stream_id, stream_id)


def test_a_stream_id_refusal_names_the_callers_field() -> None:
    assert refusal(check_stream_id, "", "correlation_id").startswith("correlation_id: ")


# --- values and timesteps ------------------------------------------------------------------------------


def test_values_come_back_as_contiguous_float32_timesteps_by_features() -> None:
    array = check_values(np.arange(6, dtype=np.float64), timesteps=3, features=2, max_timesteps=3)
    assert array.dtype == np.float32 and array.shape == (3, 2) and array.flags.c_contiguous
    assert array.tolist() == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize(("values", "timesteps", "problem"), [
    ([], 0, "timesteps: must be at least 1 (got 0)"),
    ([1.0], -1, "timesteps: must be at least 1 (got -1)"),
    ([0.0] * 10, 5, "timesteps: is 5; a chunk holds at most 4 timesteps, split it"),
    ([1.0, 2.0, 3.0], 2, "values: has 3 values; expected timesteps x features = 2 x 2 = 4"),
    ([1.0, 2.0, 3.0, np.nan], 2, "values: value 3 (timestep 1, feature 1) is nan; NaN and Inf are not accepted"),
    ([1.0, -np.inf, 3.0, 4.0], 2, "values: value 1 (timestep 0, feature 1) is -inf"),
])
def test_values_and_timesteps_are_refused_saying_why(values: list[float], timesteps: int, problem: str) -> None:
    assert refusal(check_values, np.array(values), timesteps, 2, 4).startswith(problem)


def test_values_refusals_name_the_callers_fields() -> None:
    names = {"values_field": "INPUT", "timesteps_field": "shape"}
    assert refusal(check_values, np.zeros(1), 0, 1, 4, **names).startswith("shape: ")
    assert refusal(check_values, np.zeros(3), 2, 1, 4, **names).startswith("INPUT: ")


# --- start offset, request id, the whole chunk ---------------------------------------------------------


def test_a_reset_starts_at_offset_0_only() -> None:
    check_start(None, True)
    check_start(0, True)
    check_start(7, False)
    assert refusal(check_start, 7, True) == "start_offset: is 7, but reset starts a new sequence at offset 0"
    assert refusal(check_start, 7, True, "sequence_start").startswith("sequence_start: ")


def test_make_chunk_carries_every_field() -> None:
    chunk = make_chunk(stream_id="s", values=np.ones(4), timesteps=2, features=2, max_timesteps=8, start_offset=0,
                       reset=True, end=True, request_id="r" * 256, tenant="team")
    assert (chunk.stream_id, chunk.start_offset, chunk.reset, chunk.end, chunk.tenant) == ("s", 0, True, True, "team")
    assert chunk.request_id == "r" * 256 and chunk.values.shape == (2, 2)
    one_shot = make_chunk(stream_id=None, values=np.ones(1), timesteps=1, features=1, max_timesteps=1)
    assert one_shot.stream_id is None and one_shot.start_offset is None and not one_shot.reset


@pytest.mark.parametrize(("fields", "problem"), [
    ({"stream_id": ""}, "stream_id: must not be empty"),
    ({"start_offset": 3, "reset": True}, "start_offset: is 3, but reset"),
    ({"request_id": "r" * 257}, "request_id: is 257 characters long; at most 256"),
    ({"timesteps": 3}, "values: has 4 values; expected timesteps x features = 3 x 2 = 6"),
])
def test_make_chunk_refuses_each_field(fields: dict, problem: str) -> None:
    request = {"stream_id": "s", "values": np.ones(4), "timesteps": 2, "features": 2, "max_timesteps": 8, **fields}
    assert refusal(make_chunk, **request).startswith(problem)
