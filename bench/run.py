"""One command, one run: this server beside its no-model ceiling and the per-request `model.predict`
peer, each driven by lstm-loadtest with the same load, on the same machine, one server at a time.

    python -m bench.run                      # the full matrix, about 8 minutes
    python -m bench.run --duration 2 --quick # 64 streams only, a smoke run

Servers (each with the default model and its own fresh Redis, append-only file on, `appendfsync everysec`
as shipped):
- lstm-serve:  this server as shipped (`--workers` as given).
- ceiling:     the same server with `--identity-model`: the same gRPC, batching and Redis work, no model
               call. The share of it that lstm-serve reaches says what the model costs.
- predict:     bench/peers/keras_predict_server.py, per chunk load state, `model.predict`, save.

Loads: 1, 16, 64 and 256 streams, chunks of 1 and 20 timesteps, unary Predict and streaming
PredictStream, closed loop with one chunk in flight per stream (the predict peer only at 1 and 16
streams: it serves one chunk at a time, so more streams only queue). It prints one table with
chunks/s, p50 and p99 and the ratios, the Redis memory per stream, and writes every report to JSON.

Then, where perf_analyzer is on the machine, Triton's own load generator drives this server, its no-model
ceiling, its front-end floor and Triton itself (when ../shared/peers/triton is set up) in the same run:
bench/perf_analyzer.py, whose table follows (`--no-perf-analyzer` skips it; `python -m bench.perf_analyzer`
runs it alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench import perf_analyzer
from devkit import ROOT
from devkit.processes import RedisServer, ServerProcess, free_port, wait_until
from loadtest.config import LoadConfig
from loadtest.run import run_load
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc as pb_grpc
from server.config import DEFAULT_MODEL

STREAMS = (1, 16, 64, 256)
TIMESTEPS = (1, 20)
APIS = ("unary", "stream")
PEER_STREAMS = (1, 16)


class Served:
    """The Keras-predict peer (bench/peers/keras_predict_server.py) on a free port, ready once GetModel answers."""

    def __init__(self, name: str, command: list[str], port: int) -> None:
        self.name = name
        self.address = f"127.0.0.1:{port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-{name}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        channel = grpc.insecure_channel(self.address)
        stub = pb_grpc.StreamInferenceStub(channel)

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"{name} exited; see {self.log.name}")
            try:
                stub.GetModel(pb.GetModelRequest(), timeout=1)
                return True
            except grpc.RpcError:
                return False

        wait_until(ready, 120, f"{name} to answer", interval_s=0.3)
        channel.close()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def start(name: str, redis_url: str, workers: int) -> Served | ServerProcess:
    """`name` is "predict" (the peer), "lstm-serve" or "ceiling" (lstm-serve with --identity-model)."""
    if name == "predict":
        port = free_port()  # the peer takes no --port 0
        return Served(name, [sys.executable, "-m", "bench.peers.keras_predict_server", "--port", str(port),
                             "--redis-url", redis_url], port)
    flags = ["--workers", str(workers), *(["--identity-model"] if name == "ceiling" else [])]
    served = ServerProcess(redis_url, DEFAULT_MODEL, *flags, metrics_port=0, ready_timeout_s=120)
    time.sleep(8)  # let the background XLA compilation of the warm-up shapes finish before measuring
    return served


def loads(name: str, quick: bool) -> list[tuple[int, int, str]]:
    streams = (64,) if quick else PEER_STREAMS if name == "predict" else STREAMS
    return [(s, t, api) for t in TIMESTEPS for s in streams for api in APIS]


def drive(target: str, streams: int, timesteps: int, api: str, duration: float) -> dict[str, Any]:
    config = LoadConfig(
        target=target, streams=streams, chunk_timesteps=timesteps, api=api, in_flight=streams,
        duration_s=duration, warmup_s=1.0, channels=min(8, streams), processes=1, timeout_s=60.0,
        stream_prefix=f"bench-{target.rsplit(':', 1)[1]}-{streams}-{timesteps}-{api}",
    )
    return run_load(config)


def redis_memory_per_stream(target: str, redis: RedisServer, count: int = 200) -> dict[str, float]:
    """Write `count` streams' slots (one 20-step chunk each) and ask Redis what each key costs."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.StreamInferenceStub(channel)
        model = stub.GetModel(pb.GetModelRequest())
        x = np.zeros(20 * model.input_features, np.float32)
        for n in range(count):
            stub.Predict(pb.PredictRequest(stream_id=f"memory-{n}", values=x, timesteps=20))
    client = redis.client()
    usage = [client.memory_usage(f"lstm:{{memory-{n}}}", samples=0) for n in range(count)]
    raw = model.state_size * 4
    return {"raw_state_bytes": raw, "memory_usage_bytes": float(np.median(usage)),
            "budget_bytes": 1.5 * raw + 100, "ratio_to_raw": float(np.median(usage)) / raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per load (after 1 s warm-up)")
    parser.add_argument("--quick", action="store_true", help="64 streams only")
    parser.add_argument("--workers", type=int, default=1, help="lstm-serve worker processes")
    parser.add_argument("--servers", default="lstm-serve,ceiling,predict")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--no-perf-analyzer", action="store_true", help="skip the perf_analyzer side-by-side")
    args = parser.parse_args()

    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "duration_s": args.duration, "workers": args.workers,
        "redis_appendfsync": perf_analyzer.SHIPPED_APPENDFSYNC, "runs": [],
    }
    for name in args.servers.split(","):
        redis = RedisServer(appendfsync=perf_analyzer.SHIPPED_APPENDFSYNC)  # as docker-compose.yml ships it
        served = start(name, redis.url, args.workers)
        try:
            for streams, timesteps, api in loads(name, args.quick):
                report = drive(served.address, streams, timesteps, api, args.duration)
                latency = report["latency_ms"]
                row = {"server": name, "streams": streams, "timesteps": timesteps, "api": api,
                       "chunks_per_s": report["chunks_per_s"], "p50_ms": latency["p50"], "p99_ms": latency["p99"],
                       "errors": report["errors_total"]}
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
            if name == "lstm-serve":
                results["redis_memory"] = redis_memory_per_stream(served.address, redis)
        finally:
            served.stop()
            redis.stop()
    print_table(results)
    if not args.no_perf_analyzer and perf_analyzer.perf_analyzer_command() is not None:
        results["perf_analyzer"] = perf_analyzer.side_by_side(
            list(perf_analyzer.SERVERS), args.workers, 4000,
            "streaming" if args.quick else ",".join(mode.name for mode in perf_analyzer.MODES))
        perf_analyzer.print_table(results["perf_analyzer"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {args.json}")


def print_table(results: dict[str, Any]) -> None:
    runs = {(r["server"], r["streams"], r["timesteps"], r["api"]): r for r in results["runs"]}
    peer_best = max((r["chunks_per_s"] for r in results["runs"] if r["server"] == "predict"), default=None)
    print("\n| streams | T | api | lstm-serve chunks/s | p50 ms | p99 ms | ceiling chunks/s | of ceiling |"
          " predict chunks/s | x predict |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for (server, streams, timesteps, api), ours in sorted(runs.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][3])):
        if server != "lstm-serve":
            continue
        ceiling = runs.get(("ceiling", streams, timesteps, api))
        peer = runs.get(("predict", streams, timesteps, api))
        peer_rate = peer["chunks_per_s"] if peer else peer_best
        cells = [
            str(streams), str(timesteps), api, f"{ours['chunks_per_s']:,.0f}", f"{ours['p50_ms']:.2f}",
            f"{ours['p99_ms']:.2f}",
            f"{ceiling['chunks_per_s']:,.0f}" if ceiling else "-",
            f"{100 * ours['chunks_per_s'] / ceiling['chunks_per_s']:.0f} %" if ceiling else "-",
            (f"{peer_rate:,.1f}" + ("" if peer else "*")) if peer_rate else "-",
            f"{ours['chunks_per_s'] / peer_rate:,.0f}x" if peer_rate else "-",
        ]
        print("| " + " | ".join(cells) + " |")
    if peer_best:
        print("* the predict peer serves one chunk at a time; where it was not run, its best rate is used")
    memory = results.get("redis_memory")
    if memory:
        print(f"\nRedis MEMORY USAGE per stream: {memory['memory_usage_bytes']:.0f} bytes for "
              f"{memory['raw_state_bytes']} bytes of raw state ({memory['ratio_to_raw']:.2f}x; "
              f"budget 1.5x + 100 = {memory['budget_bytes']:.0f})")


if __name__ == "__main__":
    main()
