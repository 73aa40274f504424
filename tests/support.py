"""Real processes for the tests: a redis-server on a free loopback port and lstm-serve subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstm_stream.v1 import stream_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "default.keras"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Poll until condition() is truthy; fail the test with `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class RedisServer:
    """A private redis-server on a free loopback port, data in a temporary folder."""

    def __init__(self, appendonly: bool = True) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run ./scripts/test, which installs it")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="lstm-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._command = [
            binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir, "--save", "",
            "--appendonly", "yes" if appendonly else "no", "--appendfsync", "always", "--daemonize", "no",
            "--logfile", os.path.join(self.dir, "redis.log"),
        ]
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(self._command, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        wait_until(self._answers, 10, f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.exceptions.ConnectionError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class ServerProcess:
    """`python -m server` on a free port, ready once its health check says SERVING."""

    def __init__(self, redis_url: str, model: Path | str = DEFAULT_MODEL, *extra: str,
                 port: int | None = None, ready_timeout_s: float = 90) -> None:
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_port = free_port()
        self.log_path = Path(tempfile.mkstemp(prefix="lstm-serve-", suffix=".log")[1])
        command = [
            sys.executable, "-m", "server", "--model", str(model), "--port", str(self.port),
            "--redis-url", redis_url, "--redis-autostart", "false", "--log-format", "json",
            "--metrics-port", str(self.metrics_port),
            # No load balancer to wait for in tests: stop promptly (extra flags may set it again).
            "--drain-delay-s", "0", *extra,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = stream_pb2_grpc.StreamInferenceStub(self.channel)
        try:
            wait_until(self._serving, ready_timeout_s, f"lstm-serve on {self.address}", interval_s=0.2)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"server did not become ready; its log:\n{self.log()}") from None

    def _serving(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"server exited with {self.process.returncode}; its log:\n{self.log()}")
        try:
            health = health_pb2_grpc.HealthStub(self.channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.channel.close()
        return self.process.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def triton_messages() -> tuple[ModuleType, ModuleType]:
    """Triton's generated messages and stubs: tritonclient's copy, or the server's own when this process
    already loaded that one. Both declare the protobuf package `inference` (the same wire format), and
    only one of them fits in protobuf's default descriptor pool."""
    if "lstm_stream.triton.grpc_service_pb2" in sys.modules:
        from lstm_stream.triton import grpc_service_pb2 as messages
        from lstm_stream.triton import grpc_service_pb2_grpc as stubs
    else:
        from tritonclient.grpc import service_pb2 as messages
        from tritonclient.grpc import service_pb2_grpc as stubs
    return messages, stubs
