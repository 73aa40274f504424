"""Chunks/s through the three Redis modes, same load: one node, a three-master Redis Cluster, and a
Sentinel-managed master with two replicas and `--redis-wait-replicas 1`.

    python -m bench.redis_modes [--streams 64] [--chunk 20] [--duration 8]

Each mode gets fresh redis-server processes on loopback (persistence off in all three, so the figures
compare the topologies, not the disks), one lstm-serve with the default model, and one short
lstm-loadtest run (streaming API, one chunk in flight per stream). Everything shares this machine's
cores, so the figures are one run each, not a benchmark of Redis: read them as relative costs.
Writes bench/results/redis_modes.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devkit.processes import ServerProcess, free_port
from devkit.redis_topologies import NodeProcess, RedisClusterNodes, SentinelGroup
from loadtest.config import LoadConfig
from loadtest.run import run_load
from server.config import DEFAULT_MODEL

RESULTS = Path(__file__).resolve().parent / "results" / "redis_modes.json"


def single() -> tuple[list[str], str, Callable[[], None]]:
    node = NodeProcess(free_port(), ["appendonly no"])
    return [], f"redis://127.0.0.1:{node.port}/0", node.stop


def cluster() -> tuple[list[str], str, Callable[[], None]]:
    nodes = RedisClusterNodes(masters=3)
    return ["--redis-cluster"], nodes.url, nodes.stop


def sentinel() -> tuple[list[str], str, Callable[[], None]]:
    group = SentinelGroup(replicas=2, sentinels=3)
    flags = [*group.server_flags, "--redis-wait-replicas", "1"]
    return flags, "redis://127.0.0.1/0", group.stop


MODES: dict[str, Callable[[], tuple[list[str], str, Callable[[], None]]]] = {
    "one node": single,
    "cluster, 3 masters": cluster,
    "sentinel, 2 replicas, WAIT 1": sentinel,
}


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    flags, url, stop_redis = MODES[name]()
    try:
        server = ServerProcess(url, DEFAULT_MODEL, *flags)
        try:
            config = LoadConfig(target=server.address, streams=args.streams, chunk_timesteps=args.chunk, api="stream",
                                duration_s=args.duration, warmup_s=args.warmup, channels=4)
            report = run_load(config)
        finally:
            server.stop()
    finally:
        stop_redis()
    return {"mode": name, "flags": flags, "chunks_per_s": report["chunks_per_s"],
            "p50_ms": report["latency_ms"]["p50"], "p99_ms": report["latency_ms"]["p99"],
            "errors": report["errors"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=20, help="timesteps per chunk")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args()
    rows = [measure(name, args) for name in MODES]
    print(f"{args.streams} streams x {args.chunk} timesteps, streaming, {args.duration:.0f} s each")
    print(f"{'mode':<30} {'chunks/s':>9} {'p50 ms':>8} {'p99 ms':>8}  errors")
    for row in rows:
        print(f"{row['mode']:<30} {row['chunks_per_s']:>9,.0f} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f}  "
              f"{row['errors'] or '-'}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.platform(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                   time.gmtime()), "load": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
