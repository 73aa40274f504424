"""Where one chunk's CPU goes: microseconds of CPU per inference, per thread and per stage of the data path.

    python -m bench.cpu_budget                      # streaming, 64 sequences, T=20, 15 s
    python -m bench.cpu_budget --mode unary --timesteps 1
    python -m bench.cpu_budget --gateways 4         # 64 sensors through 4 PredictBatchStream gateways

perf_analyzer loads a server (the default model, its own Redis), or with `--gateways G` bench/gateways.py's
gateway load (the sensors' chunks many per message); during the run this reads each server
thread's CPU time from /proc and samples the Python stacks with py-spy. CPU per inference = CPU seconds
/ inferences the server counted (its ModelStatistics), so the figure holds however busy the machine is.
The event-loop thread's time is split into stages by the share of its stack samples, each sample going
to the innermost frame that belongs to a stage (asyncio and threading frames are looked through):

    gRPC + event loop   grpc's Cython core and asyncio itself (reading, writing, waking tasks)
    servicer            server/api: interceptors, servicers, the streaming window
    conversion          protobuf <-> numpy, request validation
    batching            server/dataplane/ (plane, batcher)
    rules               server/dataplane/rules.py (the per-chunk plan) and processor.py
    state store         server/state (our code around Redis)
    redis-py            the Redis client library
    metrics             prometheus_client
    model               the model runner and TensorFlow, when called from the loop

Needs py-spy (`pip install py-spy`; ptrace must be allowed) and perf_analyzer (bench/perf_analyzer.py).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.perf_analyzer import (
    SHIPPED_APPENDFSYNC,
    Mode,
    Server,
    cpu_seconds,
    load_command,
    start_ours,
    stat_cpu_seconds,
)
from devkit import ROOT
from devkit.metrics import scrape_port, value
from devkit.peers import perf_analyzer_command
from devkit.processes import RedisServer

# (stage, pattern on a frame's file path); the first stage whose pattern matches the innermost
# non-neutral frame wins.
STAGES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("metrics", re.compile(r"prometheus_client/")),
    ("redis-py", re.compile(r"(^|/)redis/|hiredis")),
    ("model", re.compile(r"server/model/|tensorflow/|keras/")),
    ("conversion", re.compile(r"triton_convert\.py|server/api/(malformed|validation)\.py|google/protobuf")),
    ("state store", re.compile(r"server/state/")),
    ("rules", re.compile(r"server/dataplane/(processor|rules)\.py")),
    ("batching", re.compile(r"server/dataplane/")),
    ("servicer", re.compile(r"server/api/")),
)
NEUTRAL = re.compile(r"asyncio/|selectors\.py|threading\.py|concurrent/futures/|contextlib\.py|functools\.py"
                     r"|typing\.py|<string>|dataclasses\.py|enum\.py|abc\.py|copy\.py")
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process, by thread id."""
    # A thread that ended between listing and reading is left out, not counted as 0.
    return {int(task.name): stat_cpu_seconds(task / "stat") for task in Path(f"/proc/{pid}/task").iterdir()
            if (task / "stat").exists()}


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):  # innermost first
        match = FRAME.match(frame)
        path = match["file"] if match else frame
        if NEUTRAL.search(path):
            continue
        for stage, pattern in STAGES:
            if pattern.search(path):
                return stage
    return "gRPC + event loop"


def split_samples(raw: Path, loop_thread: int) -> tuple[collections.Counter[str], int]:
    """Stage counts of the event loop thread's samples (py-spy --threads raw output) and their total."""
    stages: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")  # "thread (TID)", the thread's name, then the stack, outermost first
        thread = re.match(r"thread \((\d+)\)", frames[0])
        if thread is None or int(thread[1]) != loop_thread:
            continue
        stages[stage_of(frames[2:])] += int(count)
    return stages, sum(stages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("streaming", "unary"), default="streaming")
    parser.add_argument("--timesteps", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--identity-model", action="store_true", help="the no-model ceiling instead")
    parser.add_argument("--gateways", type=int, default=0,
                        help="drive --concurrency sensors through this many PredictBatchStream gateways instead")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    pa, spy = perf_analyzer_command(), shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if pa is None or not Path(spy).exists():
        sys.exit("needs perf_analyzer (bench/perf_analyzer.py) and py-spy (pip install py-spy)")
    mode = Mode(f"{args.gateways} gateways" if args.gateways else args.mode, args.timesteps, args.concurrency,
                args.mode == "streaming")
    redis = RedisServer(appendfsync=SHIPPED_APPENDFSYNC)  # as shipped, like bench.perf_analyzer
    server = start_ours("ceiling" if args.identity_model else "lstm-serve", 1, redis)
    try:
        result = {**budget(pa, spy, server, redis, mode, args.seconds, args.gateways),
                  "redis_appendfsync": SHIPPED_APPENDFSYNC}
    finally:
        server.stop()
        redis.stop()
    print_budget(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def budget(pa: list[str], spy: str, server: Server, redis: RedisServer, mode: Mode, seconds: float,
           gateways: int = 0) -> dict[str, Any]:
    # One measurement window longer than the sampling: the load runs steadily throughout.
    if gateways:
        command = [sys.executable, "-m", "bench.gateways", "--drive", server.target, str(mode.concurrency),
                   str(mode.timesteps), str(gateways), str(seconds + 10)]
        count = functools.partial(native_chunks, server.metrics_ports)
        model_calls = functools.partial(native_model_calls, server.metrics_ports)
    else:
        command = load_command(pa, server, mode, int(1000 * (seconds + 10)), trials=1)
        count, model_calls = server.count, functools.partial(server.count, "execution_count")
    load = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        time.sleep(4)  # past perf_analyzer's start and the first compiles
        pid = server.process.pid
        with tempfile.TemporaryDirectory() as folder:
            raw = Path(folder) / "stacks.txt"
            before, redis_before, counted = thread_cpu(pid), cpu_seconds([redis.process.pid]), count()
            calls = model_calls()
            pa_before = cpu_seconds([load.pid])
            started = time.monotonic()
            subprocess.run([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250",
                            "--format", "raw", "--threads", "--nonblocking", "--output", str(raw)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.monotonic() - started
            after, redis_after, served = thread_cpu(pid), cpu_seconds([redis.process.pid]), count() - counted
            calls = model_calls() - calls
            pa_used = cpu_seconds([load.pid]) - pa_before
            names = {tid: (Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
                           if Path(f"/proc/{pid}/task/{tid}").exists() else "?") for tid in after}
            per_thread = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
            stages, samples = split_samples(raw, pid)  # the main thread (tid == pid) runs the event loop
    finally:
        load.terminate()
        load.wait(30)
    us = 1e6 / max(1, served)
    groups: collections.Counter[str] = collections.Counter()
    for tid, used in per_thread.items():
        name = "event loop (main thread)" if tid == pid else names[tid]
        groups[re.sub(r"[-_]?\d+$", "", name)] += used * us
    loop_us = per_thread.get(pid, 0.0) * us
    return {
        "mode": mode.name, "timesteps": mode.timesteps, "concurrency": mode.concurrency,
        "wall_s": round(wall, 1), "inferences": served, "infer_per_s": served / wall,
        "average_batch": served / max(1, calls),
        "threads_us_per_infer": dict(groups.most_common()),
        "loop_stages_us_per_infer": {stage: loop_us * n / max(1, samples) for stage, n in stages.most_common()},
        "redis_server_us_per_infer": (redis_after - redis_before) * us,
        "load_generator_us_per_infer": pa_used * us,
        "total_server_us_per_infer": sum(per_thread.values()) * us,
    }


def print_budget(result: dict[str, Any]) -> None:
    print(f"\n{result['mode']}, T={result['timesteps']}, {result['concurrency']} sequences: "
          f"{result['infer_per_s']:,.0f} inferences/s over {result['wall_s']} s, "
          f"{result['average_batch']:.1f} requests per model call")
    print(f"server process: {result['total_server_us_per_infer']:,.1f} us of CPU per inference")
    for name, used in result["threads_us_per_infer"].items():
        if used >= 0.5:
            print(f"  {name:32s} {used:8.1f} us")
    print("event loop thread, by stage:")
    for name, used in result["loop_stages_us_per_infer"].items():
        print(f"  {name:32s} {used:8.1f} us")
    print(f"redis-server: {result['redis_server_us_per_infer']:,.1f} us; "
          f"load generator: {result['load_generator_us_per_infer']:,.1f} us per inference")


def native_chunks(metrics_ports: tuple[int, ...]) -> int:
    """Chunks the native API's workers answered OK (gateway loads: PredictBatch's chunks)."""
    return int(sum(value(scrape_port(port), "lstm_serve_chunks_total", outcome="ok") for port in metrics_ports))


def native_model_calls(metrics_ports: tuple[int, ...]) -> int:
    return int(sum(value(samples, "lstm_serve_model_calls_total", path=path)
                   for port in metrics_ports for samples in [scrape_port(port)] for path in ("numpy", "tensorflow")))


if __name__ == "__main__":
    main()
