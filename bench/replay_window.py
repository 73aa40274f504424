"""What keeping the answers of the last K chunks costs: Redis bytes per stream and server CPU per chunk.

    python -m bench.replay_window                       # K = 1, 4, 16 at T = 20 and T = 1
    python -m bench.replay_window --windows 1,8 --timesteps 20 --rounds 3

K = 1 (`--replay-window 1`) is the server as it was before the window: only the last answer kept, records
in format 2. It is the peer, measured in the same run and in alternating order (round r runs the windows
forward when r is even, backward when it is odd), so a busier moment of the shared machine does not land
on one setting only. Each run starts a fresh server and Redis, streams `--streams` sequences of
`--chunks` chunks each through `lstm-loadtest --api stream` (closed loop, all streams in flight), then:

    record bytes     STRLEN of each stream's key (the record the compare-and-set rewrites every chunk)
    Redis bytes      MEMORY USAGE of each key (the record plus Redis' own overhead for it)
    CPU us/chunk     the server process's user + system CPU over the load / chunks answered
    chunks/s         as the load tester measured it

Figures go to stdout and, with --json, to a file (bench/results/replay_window.json by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import uuid
from pathlib import Path
from typing import Any

import redis

from devkit import ROOT
from devkit.processes import RedisServer, ServerProcess
from loadtest import LoadConfig, run_load
from server.config import DEFAULT_MODEL

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def one_run(window: int, timesteps: int, streams: int, chunks: int) -> dict[str, Any]:
    redis_server = RedisServer(appendonly=False)
    server = None
    try:
        server = ServerProcess(redis_server.url, DEFAULT_MODEL, "--replay-window", str(window),
                               "--slot-memory-mb", "64", metrics_port=0)
        prefix = f"bench-{uuid.uuid4().hex[:6]}"
        config = LoadConfig(target=server.address, streams=streams, chunk_timesteps=timesteps, api="stream",
                            duration_s=None, total_chunks=streams * chunks, warmup_s=0, stream_prefix=prefix,
                            cleanup=False)
        before = cpu_seconds(server.process.pid)
        report = run_load(config)
        cpu = cpu_seconds(server.process.pid) - before
        answered = report["totals"]["chunks"]
        client = redis.Redis.from_url(redis_server.url)
        keys = list(client.scan_iter(match=f"lstm:{{{prefix}-*", count=1000))
        record_bytes = [client.strlen(key) for key in keys]
        redis_bytes = [client.memory_usage(key) or 0 for key in keys]
        client.close()
        return {
            "window": window, "timesteps": timesteps, "streams": len(keys), "chunks": answered,
            "record_bytes": statistics.mean(record_bytes), "redis_bytes": statistics.mean(redis_bytes),
            "cpu_us_per_chunk": 1e6 * cpu / answered, "chunks_per_s": report["chunks_per_s"],
            "exit_code": report["exit_code"],
        }
    finally:
        if server is not None:
            server.stop()
        redis_server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", default="1,4,16", help="replay windows K to compare (the first is the peer)")
    parser.add_argument("--timesteps", default="20,1", help="chunk lengths T, comma-separated")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=60, help="chunks per stream (more than the largest K)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "replay_window.json"))
    args = parser.parse_args(argv)
    windows = [int(k) for k in args.windows.split(",")]
    runs: list[dict[str, Any]] = []
    for timesteps in (int(t) for t in args.timesteps.split(",")):
        for round_ in range(args.rounds):
            for window in (windows if round_ % 2 == 0 else windows[::-1]):
                run = one_run(window, timesteps, args.streams, args.chunks)
                runs.append(run)
                print(json.dumps(run), file=sys.stderr, flush=True)
    print(f"{'T':>3} {'K':>3} {'record B':>9} {'Redis B':>8} {'x K=' + str(windows[0]):>7} "
          f"{'CPU us/chunk':>12} {'x K=' + str(windows[0]):>7} {'chunks/s':>8}")
    summary = []
    for timesteps in sorted({r["timesteps"] for r in runs}, reverse=True):
        rows = {k: [r for r in runs if r["timesteps"] == timesteps and r["window"] == k] for k in windows}
        base = rows[windows[0]]
        base_bytes = statistics.mean(r["redis_bytes"] for r in base)
        base_cpu = statistics.median(r["cpu_us_per_chunk"] for r in base)
        for k in windows:
            record = statistics.mean(r["record_bytes"] for r in rows[k])
            memory = statistics.mean(r["redis_bytes"] for r in rows[k])
            cpu = statistics.median(r["cpu_us_per_chunk"] for r in rows[k])
            rate = statistics.median(r["chunks_per_s"] for r in rows[k])
            summary.append({"timesteps": timesteps, "window": k, "record_bytes": record, "redis_bytes": memory,
                            "cpu_us_per_chunk": cpu, "chunks_per_s": rate,
                            "redis_bytes_ratio": memory / base_bytes, "cpu_ratio": cpu / base_cpu})
            print(f"{timesteps:>3} {k:>3} {record:>9.0f} {memory:>8.0f} {memory / base_bytes:>7.2f} "
                  f"{cpu:>12.0f} {cpu / base_cpu:>7.2f} {rate:>8.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "summary": summary}, indent=1) + "\n")
    return 0 if all(r["exit_code"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
