"""`python -m server.healthcheck`, the image's HEALTHCHECK: exit 0 only while the server says SERVING."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from devkit import ROOT
from devkit.processes import RedisServer, ServerProcess, free_port, wait_until
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(180)


def healthcheck(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("LSTM_SERVE_")}
    return subprocess.run([sys.executable, "-m", "server.healthcheck", *args], cwd=ROOT, env={**environ, **env},
                          capture_output=True, text=True, timeout=30)


def test_serving_server_is_healthy_via_its_lstm_serve_variables(default_server: ServerProcess) -> None:
    # As in the image: the server listens on the wildcard address; the check asks on loopback.
    result = healthcheck(LSTM_SERVE_HOST="0.0.0.0", LSTM_SERVE_PORT=str(default_server.port))
    assert result.returncode == 0, result
    assert result.stdout.strip() == f"127.0.0.1:{default_server.port}: SERVING"


def test_no_server_or_unknown_service_is_unhealthy(default_server: ServerProcess) -> None:
    nothing = healthcheck("--address", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert nothing.returncode == 1 and "UNAVAILABLE" in nothing.stdout, nothing
    unknown = healthcheck("--address", default_server.address, "--service", "no.such.Service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout, unknown


def test_a_server_that_lost_redis_is_unhealthy_until_redis_is_back() -> None:
    redis_server = RedisServer()
    server = ServerProcess(redis_server.url, DEFAULT_MODEL, "--xla", "false")
    try:
        assert healthcheck("--address", server.address).returncode == 0
        redis_server.kill()
        result = wait_until(lambda: (r := healthcheck("--address", server.address)).returncode == 1 and r, 20,
                            "the health check to fail while Redis is down", interval_s=0.5)
        assert "NOT_SERVING" in result.stdout, result
        redis_server.start()
        wait_until(lambda: healthcheck("--address", server.address).returncode == 0, 20,
                   "the health check to pass once Redis is back", interval_s=0.5)
    finally:
        server.stop()
        redis_server.stop()
