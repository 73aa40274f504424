"""What tracing costs the server: CPU per chunk and chunks/s with tracing off, on, and off on another tree.

    python -m bench.tracing                         # 32 streams, T=20, 10 s a run, 3 rounds
    python -m bench.tracing --baseline main         # also tracing off on the tree of `main` (git archive)
    python -m bench.tracing --mode unary --timesteps 1

Each round starts one server per configuration, in turn, on one Redis: `off` (no OTEL_* variables), `on`
(OTEL_TRACES_EXPORTER=otlp, every request sampled, spans sent to an OTLP/gRPC receiver in this process, as a
collector would take them) and, with --baseline, `baseline-off` (the named git revision's server). A closed
loop of --streams PredictStream streams (or unary Predict callers) runs --seconds; CPU per chunk is the server
process's CPU time (all its threads, from /proc) over the chunks answered, so it holds however busy the machine
is; chunks/s depends on the machine (the load runs here too). Medians over the rounds are printed as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.perf_analyzer import stat_cpu_seconds
from devkit import ROOT
from devkit.otlp import OtlpReceiver
from devkit.processes import RedisServer, serving_ports, wait_until
from devkit.releases import release_env
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc as pb_grpc
from server.config import DEFAULT_MODEL

OFF_ENV = {"OTEL_TRACES_EXPORTER": "", "OTEL_SDK_DISABLED": ""}


class Served:
    """lstm-serve from `tree` (this checkout or another revision's files), with `env` on top of ours."""

    def __init__(self, tree: Path, redis: RedisServer, env: dict[str, str]) -> None:
        environment = release_env(tree) if tree != ROOT else dict(os.environ)
        for name, value in env.items():
            if value:
                environment[name] = value
            else:
                environment.pop(name, None)
        self.log = Path(tempfile.mkstemp(prefix="bench-tracing-", suffix=".log")[1])
        command = [sys.executable, "-m", "server", "--model", str(DEFAULT_MODEL), "--port", "0", "--redis-url",
                   redis.url, "--redis-autostart", "false", "--metrics-port", "0", "--warmup-timesteps", "1,20",
                   "--log-format", "json", "--log-level", "INFO"]  # INFO: the "serving" line names the port
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, cwd=tree, env=environment, stdout=log, stderr=subprocess.STDOUT)
        ports = wait_until(lambda: self._exited() or serving_ports(self.log.read_text(errors="replace")), 180,
                           "lstm-serve to serve", interval_s=0.2)
        self.address = f"127.0.0.1:{ports[0]}"
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1, 60, "SERVING")

    def _exited(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"lstm-serve exited: {self.log.read_text(errors='replace')[-3000:]}")

    def cpu_seconds(self) -> float:
        return stat_cpu_seconds(Path(f"/proc/{self.process.pid}/stat"))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.unlink(missing_ok=True)  # kept only when the server failed (_exited names it)


async def _load(address: str, streams: int, timesteps: int, seconds: float, unary: bool, tag: str) -> int:
    """Chunks answered by a closed loop of `streams` callers in `seconds`."""
    values = np.ones(timesteps, np.float32).tolist()
    answered = 0
    stop_at = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.StreamInferenceStub(channel)

        async def caller(index: int) -> None:
            nonlocal answered
            stream_id = f"{tag}-{index}"
            first = pb.PredictRequest(stream_id=stream_id, values=values, timesteps=timesteps, reset=True)
            later = pb.PredictRequest(stream_id=stream_id, values=values, timesteps=timesteps)
            if unary:
                await stub.Predict(first, timeout=30)
                while time.monotonic() < stop_at:
                    await stub.Predict(later, timeout=30)
                    answered += 1
                return
            call = stub.PredictStream(timeout=seconds + 30)
            await call.write(first)
            await call.read()
            while time.monotonic() < stop_at:
                await call.write(later)
                await call.read()
                answered += 1
            await call.done_writing()

        await asyncio.gather(*(caller(i) for i in range(streams)))
    return answered


def run_once(name: str, tree: Path, redis: RedisServer, env: dict[str, str], args: argparse.Namespace
             ) -> dict[str, Any]:
    served = Served(tree, redis, env)
    try:
        # A short warm-up: connections, the first batches, the exporter's channel.
        # Stream ids new in every run: a reset chunk whose data a stream already started with is a late duplicate.
        unary, tag = args.mode == "unary", f"{name}-{time.monotonic_ns()}"
        asyncio.run(_load(served.address, args.streams, args.timesteps, 2, unary, f"{tag}-warm"))
        cpu, started = served.cpu_seconds(), time.monotonic()
        chunks = asyncio.run(_load(served.address, args.streams, args.timesteps, args.seconds, unary, tag))
        elapsed, used = time.monotonic() - started, served.cpu_seconds() - cpu
    finally:
        served.stop()
    return {"config": name, "chunks_per_s": round(chunks / elapsed, 1),
            "cpu_us_per_chunk": round(used / max(chunks, 1) * 1e6, 1)}


def baseline_tree(revision: str, folder: Path) -> Path:
    tree = folder / "baseline"
    tree.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", "--format=tar", revision], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True, timeout=120)
    if archive.wait(120) != 0:
        raise RuntimeError(f"git archive {revision} failed")
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--timesteps", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=("streaming", "unary"), default="streaming")
    parser.add_argument("--baseline", help="a git revision whose server runs with tracing off as well (e.g. main)")
    args = parser.parse_args()
    receiver = OtlpReceiver()
    redis = RedisServer(appendonly=False)
    on_env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
              "OTEL_TRACES_SAMPLER": "always_on"}
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as folder:
            configs: list[tuple[str, Path, dict[str, str]]] = [("off", ROOT, OFF_ENV), ("on", ROOT, on_env)]
            if args.baseline:
                configs.insert(0, ("baseline-off", baseline_tree(args.baseline, Path(folder)), OFF_ENV))
            for _ in range(args.rounds):
                for name, tree, env in configs:
                    rows.append(run_once(name, tree, redis, env, args))
                    print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        redis.stop()
        receiver.stop()
    summary = {name: {key: statistics.median(row[key] for row in rows if row["config"] == name)
                      for key in ("chunks_per_s", "cpu_us_per_chunk")}
               for name in dict.fromkeys(row["config"] for row in rows)}
    print(json.dumps({"mode": args.mode, "streams": args.streams, "timesteps": args.timesteps,
                      "seconds": args.seconds, "rounds": args.rounds, "spans_received": len(receiver.spans),
                      "median": summary}, indent=1))


if __name__ == "__main__":
    main()
