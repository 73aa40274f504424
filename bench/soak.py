"""Soak: does the server hold steady over a long run? One command, ten minutes by default.

    python -m bench.soak                  # 10 minutes: bench/results/soak.json and bench/results/soak.png
    python -m bench.soak --minutes 2      # a shorter run, the same figures

Starts a private Redis and one `lstm-serve` (devkit), then runs `lstm-loadtest --soak` against it: 64 streaming
sensors (one PredictStream each, chunks of 20 timesteps, closed loop) and beside them 4 short-lived streams
started every second (3 chunks each, then ResetStream). Every 5 s the load tester scrapes the server's /metrics:
its resident memory, open streams, calls in flight, Redis' used memory and the server's p50/p99 over the
interval. The run fails (exit 5) when the server's RSS grows faster than --max-memory-slope MiB/h (a
least-squares line over the samples after the warm-up) or its p99 over the last fifth of the run is more than
--max-p99-drift times the first fifth's. The warm-up (a fifth of the run, at most a minute) is left out: TensorFlow's
allocations and the slot memory filling up belong to the start, not to a leak.

The load tester's table and the soak's verdict go to stdout; the exit code is the load tester's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from devkit import ROOT
from devkit.processes import RedisServer, ServerProcess
from server.config import DEFAULT_MODEL

RESULTS = ROOT / "bench" / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run, warm-up included (default 10)")
    parser.add_argument("--streams", type=int, default=64, help="streaming sensors of the main load (default 64)")
    parser.add_argument("--chunk", type=int, default=20, help="timesteps per chunk (default 20)")
    parser.add_argument("--churn", type=int, default=4, help="short-lived streams started every second (default 4)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between scrapes of /metrics (default 5)")
    parser.add_argument("--json", type=Path, default=RESULTS / "soak.json", help="the load tester's JSON report")
    parser.add_argument("--plot", type=Path, default=RESULTS / "soak.png", help="the load tester's PNG")
    parser.add_argument("loadtest_args", nargs="*", help="more lstm-loadtest flags, after --")
    args = parser.parse_args(argv)
    total_s = args.minutes * 60.0
    warmup_s = min(60.0, total_s / 5)
    redis_server = RedisServer(appendonly=False)
    server = None
    try:
        server = ServerProcess(redis_server.url, DEFAULT_MODEL)
        command = [
            sys.executable, "-m", "loadtest", "--no-progress", "--target", server.address,
            "--streams", str(args.streams), "--chunk", str(args.chunk), "--api", "stream",
            "--warmup", f"{warmup_s:g}", "--duration", f"{total_s - warmup_s:g}",
            "--soak", "--soak-metrics", f"http://127.0.0.1:{server.metrics_port}/metrics",
            "--soak-interval", f"{args.interval:g}", "--soak-churn", str(args.churn), "--soak-churn-every", "1",
            "--json", str(args.json), "--plot", str(args.plot), *args.loadtest_args,
        ]
        print("$ " + " ".join(command), file=sys.stderr, flush=True)
        return subprocess.run(command, cwd=ROOT, check=False).returncode
    finally:
        if server is not None:
            server.stop()
        redis_server.stop()


if __name__ == "__main__":
    sys.exit(main())
