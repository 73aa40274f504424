"""What --verify costs a long run: the verdict's delay after the load, the load tester's memory, the
verifier's CPU, and the load's throughput with and without it.

    python -m bench.verify_live                      # 64 streams x 20 timesteps, 120 s per run
    python -m bench.verify_live --duration 600       # issue 28's run: 10 minutes
    python -m bench.verify_live --whole-all          # also --verify-sample all (every stream whole)

One server (the shipped model, its own Redis) serves every run. The peer, measured in the same session
and in alternating order, is the same load without --verify: the throughput the verification must not
lower by more than 10 %. `--whole-all` adds the check the tool ran before the live verifier: every
stream's whole sequence recomputed after the run, whose time and memory grow with the run's length.
Each run is `lstm-loadtest --api stream` in its own process (closed loop, every stream in flight).
Figures go to stdout and with --json to a file (bench/results/verify_live.json by default).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from devkit import ROOT
from devkit.processes import RedisServer, ServerProcess
from server.config import DEFAULT_MODEL

RESULT = ROOT / "bench" / "results" / "verify_live.json"


def one_run(server: ServerProcess, label: str, flags: list[str], streams: int, timesteps: int,
            duration: float, folder: Path) -> dict[str, Any]:
    report_path = folder / f"{label}.json"
    command = [sys.executable, "-m", "loadtest", "--no-progress", "--target", server.address, "--api", "stream",
               "--streams", str(streams), "--chunk", str(timesteps), "--duration", str(duration), "--warmup", "2",
               "--json", str(report_path), *flags]
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=duration * 4 + 900)
    wall = time.monotonic() - started
    if not report_path.exists():
        raise RuntimeError(f"{label}: lstm-loadtest exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    report = json.loads(report_path.read_text())
    row: dict[str, Any] = {"run": label, "exit_code": done.returncode, "chunks_per_s": report["chunks_per_s"],
                           "chunks": report["totals"]["chunks"], "timesteps": report["totals"]["timesteps"],
                           "p99_ms": report["latency_ms"]["p99"], "wall_s": round(wall, 1)}
    verify = report["verify"]
    if verify is not None:
        verifier = verify["verifier"]
        row.update({
            "passed": verify["passed"], "rows_compared": verify["rows_compared"],
            "max_abs_diff": verify["max_abs_diff"], "verdict_after_load_s": verify["seconds"],
            "verifier_peak_rss_mib": verifier["peak_rss_mib"],
            "load_process_peak_rss_mib": verifier["load_process_peak_rss_mib"],
            "verifier_cpu_s": verifier["cpu_s"], "verifier_check_cpu_s": verifier["check_cpu_s"],
            "verifier_core_share": round(verifier["check_cpu_s"] / max(report["duration_s"] + report["warmup_s"],
                                                                       1e-9), 3),
            "verifier_us_per_chunk": round(1e6 * verifier["check_cpu_s"] / max(report["totals"]["chunks"], 1), 1),
            "held_mib_max": round(verifier["held_bytes_max"] / 2**20, 2),
            "backlog_max_timesteps": verifier["backlog_max_timesteps"],
            "whole_timesteps": verify["whole"]["timesteps"] if verify["whole"] else 0,
            "whole_seconds": verify["whole"]["seconds"] if verify["whole"] else 0.0,
        })
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--timesteps", type=int, default=20)
    parser.add_argument("--duration", type=float, default=120.0, help="measured seconds of each run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--whole-all", action="store_true", help="also run --verify --verify-sample all")
    parser.add_argument("--json", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    runs = [("no-verify", []), ("verify", ["--verify"])]
    if args.whole_all:
        runs.append(("verify-sample-all", ["--verify", "--verify-sample", "all"]))
    redis_server = RedisServer(appendonly=False)
    server = None
    rows = []
    try:
        server = ServerProcess(redis_server.url, DEFAULT_MODEL, metrics_port=0)
        folder = Path(tempfile.mkdtemp(prefix="verify-live-"))
        for round_number in range(args.rounds):
            order = runs if round_number % 2 == 0 else runs[::-1]
            for label, flags in order:
                row = one_run(server, label, flags, args.streams, args.timesteps, args.duration, folder)
                row["round"] = round_number
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if server is not None:
            server.stop()
        redis_server.stop()
    peer = [r["chunks_per_s"] for r in rows if r["run"] == "no-verify"]
    live = [r["chunks_per_s"] for r in rows if r["run"] == "verify"]
    summary = {"streams": args.streams, "timesteps": args.timesteps, "duration_s": args.duration,
               "throughput_ratio_verify_vs_peer": round(sum(live) / len(live) / (sum(peer) / len(peer)), 3),
               "runs": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
