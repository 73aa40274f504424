"""The tests' fork server (devkit/server_forks.py): a forked server behaves as `python -m server` would.

Its exit code, a signal's, its log, its environment; and a server whose import-time environment differs is
started as a fresh process instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest

from devkit.native_calls import predict, status_of
from devkit.processes import NO_WARMUP, ServerProcess
from devkit.server_forks import ForkedServer, ServerForks
from server.config import DEFAULT_MODEL
from server.errors import EXIT_STARTUP_ERROR

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def forks() -> ServerForks:
    if ServerProcess.forks is None:
        pytest.skip("LSTM_TEST_FORK_SERVERS=0: every server is a fresh process")
    return ServerProcess.forks


def test_a_forked_server_serves_logs_and_exits_as_its_process_would(forks: ServerForks, redis_server,
                                                                     tmp_path: Path) -> None:
    server = ServerProcess(redis_server.url, DEFAULT_MODEL, *NO_WARMUP, env={"LSTM_SERVE_MAX_CHUNK_TIMESTEPS": "7"})
    try:
        assert isinstance(server.process, ForkedServer)
        assert '"msg": "serving"' in server.log()
        # Its own environment, read by its configuration: a chunk of 8 timesteps is over its limit of 7.
        assert predict(server.stub, "forked-7", np.zeros((7, 1))).offset == 7
        code, message, _ = status_of(predict, server.stub, "forked-8", np.zeros((8, 1)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "7" in message, message
        assert server.process.poll() is None
        server.process.send_signal(signal.SIGKILL)
        assert server.process.wait(10) == -signal.SIGKILL
    finally:
        server.stop()

    # A start-up error exits with the command's code, and says why in its log.
    log = tmp_path / "bad.log"
    log.touch()
    bad = forks.start(["--model", str(tmp_path / "missing.keras"), "--redis-url", redis_server.url,
                       "--redis-autostart", "false", "--log-format", "json"], dict(os.environ), tmp_path, log)
    assert bad.wait(60) == EXIT_STARTUP_ERROR
    assert "missing.keras" in log.read_text()  # as a fresh process exits (tests/serving/test_startup_errors.py)

    with pytest.raises(subprocess.TimeoutExpired):
        ForkedServer(forks, 1, ["init"]).wait(0.1)  # pid 1 never exits among its children


def test_an_import_time_variable_of_its_own_starts_a_fresh_process(forks: ServerForks, redis_server) -> None:
    assert not forks.forkable({**os.environ, "OPENBLAS_NUM_THREADS": "3"})
    assert not forks.forkable({**os.environ, "OTEL_TRACES_EXPORTER": "otlp"})
    assert forks.forkable({**os.environ, "LSTM_SERVE_MAX_BATCH": "7"})
    server = ServerProcess(redis_server.url, DEFAULT_MODEL, *NO_WARMUP, env={"OPENBLAS_NUM_THREADS": "3"})
    try:
        assert isinstance(server.process, subprocess.Popen)
    finally:
        server.stop()

