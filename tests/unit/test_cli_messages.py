"""`lstm-stream` answers a stream-position error in its own terms: the flags and commands to run, never the
Python API's methods (`resume()`, `start_new()`, `window=1`), which a shell user cannot call."""

from __future__ import annotations

import re

import pytest

from lstm_stream.client.cli import EXIT_POSITION, exit_code, explain
from lstm_stream.client.errors import ClientError, OutputsLost, StreamPositionError

PYTHON_ADVICE = re.compile(r"resume\(\)|start_new\(\)|reset\(\)|window=")

CASES = [
    # (error as the client raises it, what the message must name)
    (StreamPositionError("sensor 7", 0, 30, "the stream is at offset 30"),
     ["offset 30", "lstm-stream predict 'sensor 7' FILE --resume", "without --resume", "lstm-stream reset 'sensor 7'"]),
    (StreamPositionError("sensor-7", 0, None, "written by another model"),
     ["written by another model", "without --resume", "lstm-stream reset sensor-7"]),
    (OutputsLost("sensor-7", 10, 30, 30),
     ["timesteps 10..29", "offset 30", "--resume", "--window 1"]),
]


@pytest.mark.parametrize(("error", "named"), CASES, ids=["offset-known", "offset-unknown", "outputs-lost"])
def test_a_position_error_names_flags_not_python_calls(error: StreamPositionError, named: list[str]) -> None:
    assert PYTHON_ADVICE.search(str(error)), "the Python API's own message keeps its advice"
    message = explain(error)
    assert not PYTHON_ADVICE.search(message), message
    for text in named:
        assert text in message, (text, message)
    assert exit_code(error) == EXIT_POSITION


def test_other_errors_keep_their_message() -> None:
    error = ClientError("INVALID_ARGUMENT: stream_id: must not be empty")
    assert explain(error) == str(error)
