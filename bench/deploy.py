"""Sizing figures for docs/deploy.md, on the process topology (devkit/topology.py): about 3 minutes.

    python -m bench.deploy [--duration 10] [--streams 64] [--chunk 20]

1. One replica behind Envoy: the same closed-loop lstm-loadtest straight at the replica and through
   Envoy (the cost of the hop), with --streams sensors and with one.
2. Two replicas behind Envoy: the same load through Envoy (chunks/s with a second replica).
3. Redis bytes per stream: MEMORY USAGE of every stream key the load left behind (--no-cleanup).
The load generator, Redis, Envoy and the replicas share this machine's cores: read the figures as
relative, and rerun; on a shared machine they move by 20 % or more.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import redis

from devkit import ROOT
from devkit.topology import Topology


def load(target: str, args: argparse.Namespace, prefix: str, cleanup: bool = True,
         streams: int | None = None) -> dict[str, Any]:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    streams = streams or args.streams
    command = [sys.executable, "-m", "loadtest", "--no-progress", "--target", target, "--streams", str(streams),
               "--chunk", str(args.chunk), "--duration", str(args.duration), "--warmup", "2",
               "--stream-prefix", prefix, "--json", str(out)]
    if not cleanup:
        command.append("--no-cleanup")
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    report = json.loads(out.read_text())
    out.unlink()
    return report


def row(name: str, report: dict[str, Any]) -> dict[str, Any]:
    latency = report["latency_ms"]
    figures = {"run": name, "chunks_per_s": round(report["chunks_per_s"], 1), "p50_ms": round(latency["p50"], 2),
               "p99_ms": round(latency["p99"], 2), "errors": report["errors_total"]}
    print(json.dumps(figures), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=20)
    args = parser.parse_args()
    results = []
    for replicas in (1, 2):
        topology = Topology(replicas=replicas, envoy_concurrency=1)
        try:
            topology.start()
            if replicas == 1:
                load(topology.members[0].address, args, "warm")  # XLA shapes, connections
                results.append(row("1 replica, direct", load(topology.members[0].address, args, "direct")))
                results.append(row("1 replica, through Envoy", load(topology.address, args, "envoy1")))
                # One stream, one chunk in flight: the latency the hop adds to a single call.
                results.append(row("1 stream, direct", load(topology.members[0].address, args, "direct1", streams=1)))
                results.append(row("1 stream, through Envoy", load(topology.address, args, "envoy11", streams=1)))
            else:
                load(topology.address, args, "warm")
                results.append(row("2 replicas, through Envoy", load(topology.address, args, "envoy2", cleanup=False)))
                client = redis.Redis.from_url(topology.redis_url)
                sizes = [client.memory_usage(key, samples=0) for key in client.scan_iter(match="lstm:{envoy2-*")]
                figures = {"run": "redis bytes per stream", "streams": len(sizes),
                           "median_bytes": statistics.median(sizes), "max_bytes": max(sizes),
                           "used_memory": client.info("memory")["used_memory"]}
                print(json.dumps(figures), flush=True)
                results.append(figures)
        finally:
            topology.stop()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
