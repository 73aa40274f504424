"""The private Redis `lstm-serve` starts: with the URL's credentials, loopback only, and shared safely
(issue 24, items 7 and 11; docs/operations.md, "A private Redis").

Before: `--redis-url 'redis://:AutoPw1234@127.0.0.1:16455/0'` with nothing on the port started a
redis-server without a password (PONG to anyone on the machine); and a second lstm-serve using the first
one's private Redis went NOT_SERVING for good when the first was stopped with Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import quote

import grpc
import numpy as np
import pytest
import redis

from devkit import ROOT
from devkit.native_calls import predict
from devkit.processes import free_port, no_retry, serving_ports, wait_until
from lstm_stream.v1 import stream_pb2_grpc
from server.state.launcher import MARKER

pytestmark = pytest.mark.timeout(300)


class _Server:
    """lstm-serve with autostart on (the README's path), its output in a file."""

    def __init__(self, url: str, data_dir: Path, log: Path) -> None:
        command = [sys.executable, "-m", "server", "--port", "0", "--metrics-port", "0", "--redis-url", url,
                   "--redis-data-dir", str(data_dir), "--drain-delay-s", "0", "--log-format", "json"]
        self.log_path = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        port = wait_until(self._port, 120, "lstm-serve to serve", interval_s=0.2)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = stream_pb2_grpc.StreamInferenceStub(self.channel)

    def _port(self) -> int | None:
        if self.process.poll() is not None:
            raise RuntimeError(f"lstm-serve exited with {self.process.returncode}:\n{self.log()}")
        ports = serving_ports(self.log())
        return ports[0] if ports else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.channel.close()
        return self.process.returncode


def _entries(log: str, message: str) -> list[dict]:
    found = []
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if message in entry.get("msg", ""):
            found.append(entry)
    return found


def _stop_private_redis(port: int, password: str | None, username: str | None = None) -> None:
    """Whatever a failing test left behind on its port."""
    with contextlib.suppress(redis.exceptions.RedisError):
        redis.Redis(port=port, username=username, password=password, socket_timeout=2,
                    retry=no_retry()).shutdown(nosave=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def _predict_when_serving(stub, stream: str, x: np.ndarray) -> int:
    """The offset after one more chunk, once the server answers again (a restarted Redis takes a moment)."""
    def attempt() -> int | None:
        try:
            return predict(stub, stream, x, timeout=5).offset
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None
            raise
    return wait_until(attempt, 60, "the server to answer again", interval_s=0.3)


@pytest.mark.parametrize("user", ["", "app"])
def test_a_private_redis_is_started_with_the_urls_credentials(tmp_path: Path, user: str) -> None:
    # Every character a URL or redis.conf treats specially, percent-encoded in the URL as docs/security.md says.
    port, password = free_port(), f"AutoPw{uuid.uuid4().hex} #/?@:%\"\\"
    url = f"redis://{user}:{quote(password, safe='')}@127.0.0.1:{port}/0"
    server = _Server(url, tmp_path / "redis", tmp_path / "server.log")
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):  # NOAUTH: not PONG to anyone
            redis.Redis(port=port, socket_timeout=2, retry=no_retry()).ping()
        assert redis.Redis(port=port, username=user or None, password=password, socket_timeout=2).ping()
        if user:  # the default user is off: the URL's user is the only way in, even with the right password
            with pytest.raises(redis.exceptions.AuthenticationError):
                redis.Redis(port=port, password=password, socket_timeout=2, retry=no_retry()).ping()
        (started,) = _entries(server.log(), "private redis-server was started")
        assert ("ACL user 'app'" if user else "requirepass") in started["credentials"]
        pid = json.loads((tmp_path / "redis" / MARKER).read_text())["pid"]
        assert password[:38] not in Path(f"/proc/{pid}/cmdline").read_text()  # nor in `ps`
        assert predict(server.stub, f"auth-{uuid.uuid4().hex[:6]}", np.ones((3, 1), np.float32)).offset == 3
    finally:
        server.stop()
        _stop_private_redis(port, password, user or None)
    log, marker = server.log(), (tmp_path / "redis" / MARKER).read_text()
    assert password[:38] not in log + marker and quote(password, safe="") not in log + marker


@pytest.mark.parametrize("url, says", [
    ("redis://:NotLoopPw1234@192.0.2.1:{port}/0", "loopback"),
    ("redis://UserOnly1234@127.0.0.1:{port}/0", "no password"),
])
def test_no_private_redis_for_another_host_or_half_credentials(url: str, says: str) -> None:
    port = free_port()
    command = [sys.executable, "-m", "server", "--port", "0", "--metrics-port", "0",
               "--redis-url", url.format(port=port), "--redis-autostart", "true"]
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        _stop_private_redis(port, None)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and says in output and "no Redis" in output, output[-2000:]
    assert "1234" not in output
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis(port=port, socket_connect_timeout=1, retry=no_retry()).ping()


@pytest.mark.timeout(480)
def test_a_neighbours_ctrl_c_never_stops_a_server_sharing_its_private_redis(tmp_path: Path) -> None:
    """A starts the private Redis; B (another port, its own data-dir flag) uses it. A's Ctrl-C leaves it
    running for B; the Redis stopping anyway is restarted by B from its folder, data back; B's exit stops it."""
    port, password = free_port(), f"SharedPw{uuid.uuid4().hex}"
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    stream, x = f"shared-{uuid.uuid4().hex[:8]}", np.ones((2, 1), np.float32)
    first = _Server(url, tmp_path / "redis", tmp_path / "first.log")
    second = None
    try:
        second = _Server(url, tmp_path / "elsewhere", tmp_path / "second.log")
        assert _entries(second.log(), "using the private redis-server another lstm-serve started")
        assert predict(second.stub, stream, x).offset == 2
        assert predict(first.stub, stream, x).offset == 4
        assert first.stop(signal.SIGINT) == 0  # Ctrl-C
        assert _entries(first.log(), "left the private Redis running")
        assert predict(second.stub, stream, x, timeout=10).offset == 6  # no outage at all
        # The private Redis stops anyway (SIGTERM: its append-only file flushed): B brings it back, with data.
        marker = json.loads((tmp_path / "redis" / MARKER).read_text())
        os.kill(marker["pid"], signal.SIGTERM)
        wait_until(lambda: not _alive(marker["pid"]), 30, "the private Redis to stop")
        assert _predict_when_serving(second.stub, stream, x) == 8
        wait_until(lambda: _entries(second.log(), "restarted it from its data folder"), 30, "B's restart logged")
        assert not (tmp_path / "elsewhere" / MARKER).exists()  # B restarted it in A's folder, not its own
        assert second.stop() == 0
        with pytest.raises(redis.exceptions.ConnectionError):  # the last user stopped it
            redis.Redis(port=port, password=password, socket_connect_timeout=1, retry=no_retry()).ping()
    finally:
        first.stop()
        if second is not None:
            second.stop()
        _stop_private_redis(port, password)
    assert password not in first.log() + (second.log() if second else "")
