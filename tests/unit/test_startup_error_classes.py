"""Every start-up failure is one `StartupError` (server/errors.py), reported by lstm-serve in one line.

server/app/main.py catches StartupError once and logs `log_line()`: each subclass keeps the words the
server always wrote before its message, so operators' alerts and the tests that read them still match.
"""

from __future__ import annotations

import pytest

from server.errors import EXIT_STARTUP_ERROR, StartupError
from server.state.connection import TopologyError
from server.state.launcher import RedisUnavailable


@pytest.mark.parametrize(("error", "line"), [
    (RedisUnavailable("nothing answers"), "no Redis: nothing answers"),
    (TopologyError("not a cluster"), "Redis is not as configured: not a cluster"),
    (StartupError("cannot listen on 0.0.0.0:1"), "cannot listen on 0.0.0.0:1"),
])
def test_a_start_up_failure_is_one_line_with_its_headline(error: StartupError, line: str) -> None:
    assert isinstance(error, StartupError)
    assert error.log_line() == line


def test_the_exit_code_tells_the_supervisor_not_to_restart() -> None:
    # 2, what argparse exits with for a bad flag: every start-up error is a configuration error.
    assert EXIT_STARTUP_ERROR == 2
