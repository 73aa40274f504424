"""Gateways against Triton, in one run: many sensors per message (PredictBatchStream) beside Triton's best mode.

    python -m bench.gateways                  # both loads, 1, 4 and 16 gateways, about 8 minutes
    python -m bench.gateways --quick          # 64 x 20 through 4 gateways only

Loads (issue 26): 64 sensors x 20 timesteps per chunk, and 256 sensors x 1 timestep. For each:
- triton:  Triton 2.51's sequence batcher (../shared/peers/triton), driven by perf_analyzer (C++) with as many
           concurrent sequences as sensors, unary and --streaming; its best mode is the peer. Its sequence batcher
           takes one sequence per request (batch dimension 1): a gateway cannot pack sensors into one request.
- lstm-serve, G gateways: this server as shipped (default model, its own Redis, appendfsync everysec), and again
           with other flags (`--server-flags`; by default GATEWAY_FLAGS, without the busy delay), driven
           by `GatewayLoad` below: G connections, each one PredictBatchStream carrying its sensors' chunks, one
           message in flight per gateway (so one chunk in flight per sensor, as perf_analyzer keeps one request
           in flight per sequence). Values travel in the message's float32 block.
- lstm-serve, single streams: the same server driven by perf_analyzer's --streaming mode (one sensor, one
           PredictStream): today's path, for the latency a sensor sees through a gateway.

Figures per row: inferences/s (chunks answered OK, each one sensor's inference), CPU microseconds per inference of
the server's process tree and its Redis (from /proc, so they hold however busy the machine is), and the p50 and
p99 of one message's round trip (every sensor of a tick waits for its gateway's message). The load generators run
on the same 2 cores: perf_analyzer is C++, GatewayLoad a lean asyncio loop in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.perf_analyzer import Mode, Server, measure, start_ours, start_triton
from devkit import ROOT
from devkit.peers import perf_analyzer_command, triton_server_available
from devkit.processes import RedisServer
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc as pb_grpc

LOADS = ((64, 20), (256, 1))  # (sensors, timesteps per chunk)
GATEWAYS = (1, 4, 16)
# The second set of rows: the server without what it does for gateway fleets by default, so the same run shows
# what that gives. --max-batch 256 and --max-in-flight 2 are defaults since the first gateway work, and so is a
# millisecond for the callers answered last to send again before a batch starts (--busy-delay-ms); this turns
# that off.
GATEWAY_FLAGS = "--busy-delay-ms 0"


@dataclass
class GatewayStats:
    inferences: int = 0
    messages: int = 0
    errors: int = 0
    latencies: list[float] | None = None


class GatewayLoad:
    """G gateways, each one PredictBatchStream call carrying one tick of its sensors per message, the next tick
    sent once the last is answered. Every sensor continues its sequence (offsets checked on every answer)."""

    def __init__(self, target: str, sensors: int, timesteps: int, gateways: int, seed: int = 0) -> None:
        self.target, self.sensors, self.timesteps, self.gateways = target, sensors, timesteps, gateways
        self.rng = np.random.default_rng(seed)
        self.prefix = f"gw-{os.getpid()}-{time.monotonic_ns() % 10**9}"

    def run(self, warmup_s: float, duration_s: float) -> dict[str, Any]:
        return asyncio.run(self._run(warmup_s, duration_s))

    async def _run(self, warmup_s: float, duration_s: float) -> dict[str, Any]:
        share = [list(range(g, self.sensors, self.gateways)) for g in range(self.gateways)]
        stats = GatewayStats(latencies=[])
        measuring = asyncio.Event()
        stop = asyncio.Event()
        channels = [grpc.aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(self.gateways)]
        tasks = [asyncio.create_task(self._gateway(channel, ids, stats, measuring, stop))
                 for channel, ids in zip(channels, share, strict=True)]
        await asyncio.sleep(warmup_s)
        measuring.set()
        started, before = time.monotonic(), stats.inferences
        await asyncio.sleep(duration_s)
        stop.set()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
        for channel in channels:
            await channel.close()
        latencies = np.asarray(stats.latencies) * 1000
        return {
            "inferences": stats.inferences - before, "seconds": elapsed,
            "infer_per_s": (stats.inferences - before) / elapsed, "messages": stats.messages,
            "errors": stats.errors,
            "p50_ms": float(np.percentile(latencies, 50)) if latencies.size else None,
            "p99_ms": float(np.percentile(latencies, 99)) if latencies.size else None,
        }

    async def _gateway(self, channel: grpc.aio.Channel, ids: list[int], stats: GatewayStats,
                       measuring: asyncio.Event, stop: asyncio.Event) -> None:
        n, t = len(ids), self.timesteps
        request = pb.PredictBatchRequest(chunks=[
            pb.PredictRequest(stream_id=f"{self.prefix}-{i}", timesteps=t, reset=True, start_offset=0) for i in ids])
        # A pool of value blocks drawn once: the generator's cost per message stays a few microseconds.
        blocks = [self.rng.normal(0, 1, size=n * t).astype("<f4").tobytes() for _ in range(16)]
        call = pb_grpc.StreamInferenceStub(channel).PredictBatchStream()
        offset, tick = 0, 0
        try:
            while not stop.is_set():
                request.values = blocks[tick % len(blocks)]
                began = time.perf_counter()
                await call.write(request)
                response = await call.read()
                took = time.perf_counter() - began
                if response is grpc.aio.EOF or response.HasField("error"):
                    raise RuntimeError(f"gateway message refused: {response}")
                ok = [r.offset for r in response.results if not r.HasField("error")]
                if len(ok) != n or any(o != offset + t for o in ok):
                    stats.errors += n - len(ok)
                    raise RuntimeError(f"unexpected offsets or errors: {response.results[0]}")
                stats.inferences += n
                stats.messages += 1
                if measuring.is_set():
                    stats.latencies.append(took)  # type: ignore[union-attr]
                offset += t
                tick += 1
                if tick == 1:
                    for chunk in request.chunks:
                        chunk.reset = False
                for chunk in request.chunks:
                    chunk.start_offset = offset
        finally:
            await call.done_writing()
            call.cancel()


def _cpu_row(server: Server, load: GatewayLoad, warmup_s: float, duration_s: float) -> dict[str, Any]:
    # CPU of the measured window only: the warm-up runs first, inside GatewayLoad.run; so measure around
    # a run without warm-up after a short warm-up run.
    load.run(0.5, warmup_s)
    cpu = server.cpu()
    row = load.run(0.0, duration_s)
    row["server_cpu_us_per_infer"] = 1e6 * (server.cpu() - cpu) / row["inferences"] if row["inferences"] else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 x 20 through 4 gateways only (and the peers)")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds of each gateway run")
    parser.add_argument("--interval-ms", type=int, default=4000, help="perf_analyzer's measurement window")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "gateways.json")
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--server-flags", default=GATEWAY_FLAGS,
                        help=f"lstm-serve's flags for the second set of gateway rows (default: {GATEWAY_FLAGS!r})")
    parser.add_argument("--drive", nargs=5, metavar=("TARGET", "SENSORS", "TIMESTEPS", "GATEWAYS", "SECONDS"),
                        help="only drive a running server this long (bench.cpu_budget's gateway load)")
    args = parser.parse_args()
    if args.drive:
        target, sensors, timesteps, count, seconds = args.drive
        GatewayLoad(target, int(sensors), int(timesteps), int(count)).run(0.0, float(seconds))
        return
    loads = LOADS[:1] if args.quick else LOADS
    gateways = (4,) if args.quick else GATEWAYS
    pa = perf_analyzer_command()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "tool": "bench.gateways",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "rows": [], "notes": [],
    }

    def record(row: dict[str, Any]) -> None:
        results["rows"].append(row)
        print(json.dumps(row), flush=True)

    if pa is not None and triton_server_available() and not args.no_triton:
        triton = start_triton()
        try:
            for sensors, timesteps in loads:
                for streaming in (False, True):
                    mode = Mode(f"{'streaming' if streaming else 'unary'}", timesteps, sensors, streaming)
                    row = measure(pa, triton, mode, args.interval_ms)
                    record({"load": f"{sensors}x{timesteps}", "via": "perf_analyzer", **row})
                    if "failed" in row:  # its streaming mode hangs or crashes at times: start it again
                        triton.stop()
                        triton = start_triton()
        finally:
            triton.stop()
    else:
        results["notes"].append("triton: not set up or perf_analyzer missing (../shared/peers/triton/setup.sh)")

    results["server_flags"] = args.server_flags
    for flags in ((), tuple(args.server_flags.split())):
        redis = RedisServer(appendfsync="everysec")
        ours = start_ours("lstm-serve", 1, redis, flags)
        name = "lstm-serve " + " ".join(flags) if flags else "lstm-serve"
        try:
            for sensors, timesteps in loads:
                if pa is not None and not flags:
                    mode = Mode("single streams", timesteps, sensors, True)
                    measure(pa, ours, mode, 1000, trials=1)  # compiles the shapes this traffic needs
                    record({"load": f"{sensors}x{timesteps}", "via": "perf_analyzer",
                            **measure(pa, ours, mode, args.interval_ms)})
                for count in gateways:
                    load = GatewayLoad(ours.target, sensors, timesteps, count)
                    row = _cpu_row(ours, load, 2.0, args.duration)
                    record({"server": name, "name": f"{count} gateways", "load": f"{sensors}x{timesteps}",
                            "gateways": count, "via": "bench.gateways", **row})
        finally:
            ours.stop()
            redis.stop()
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {args.json}")


def print_table(results: dict[str, Any]) -> None:
    rows = results["rows"]
    print(f"\n{results['date']}, {results['machine']['cpus']} cores shared by server, Redis and load generator")
    print("| load | server | mode | infer/s | x Triton best | p50 ms | p99 ms | CPU us/infer | x Triton's |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for load in dict.fromkeys(r["load"] for r in rows):
        peers = [r for r in rows if r["load"] == load and r["server"] == "triton" and "infer_per_s" in r]
        best = max(peers, key=lambda r: r["infer_per_s"], default=None)
        for r in (r for r in rows if r["load"] == load):
            if "infer_per_s" not in r:
                print(f"| {load} | {r['server']} | {r['name']} | {r.get('failed', 'failed')} | | | | | |")
                continue
            ratio = f"{r['infer_per_s'] / best['infer_per_s']:.2f}x" if best else "-"
            cpu = r.get("server_cpu_us_per_infer")
            cpu_ratio = (f"{cpu / best['server_cpu_us_per_infer']:.2f}x"
                         if best and cpu and best.get("server_cpu_us_per_infer") else "-")
            print(f"| {load} | {r['server']} | {r['name']} | {r['infer_per_s']:,.0f} | {ratio} | "
                  f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {cpu:,.0f} | {cpu_ratio} |" if cpu else
                  f"| {load} | {r['server']} | {r['name']} | {r['infer_per_s']:,.0f} | {ratio} | "
                  f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | - | - |")
    print("x Triton best: against Triton's faster mode (unary or streaming) on the same load; CPU: the server's "
          "process tree and its Redis, per inference")
    for note in results["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
