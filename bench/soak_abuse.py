"""Soak: normal lstm-loadtest load beside clients that abuse the server, with its memory sampled.

Invariant 12 (docs/invariants.md): memory stays flat under abuse while everyone else is served. This
starts a private Redis and one `lstm-serve`, runs `lstm-loadtest` (streaming sensors, offsets on) for
--duration seconds, and beside it --abusers PredictStream clients that never read their answers:
half send 16 MiB messages (refused by the message size limit; they reconnect and send again), half
send ~60 KB invalid requests as fast as the server reads them. Every --sample-s seconds it prints the
server's VmRSS; at the end a summary and the load test's figures (throughput, errors).

    PYTHONPATH=. python -m bench.soak_abuse --duration 600            # the ten-minute soak
    PYTHONPATH=. python -m bench.soak_abuse --duration 150 --json /tmp/soak.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

from devkit import ROOT
from devkit.processes import RedisServer, ServerProcess
from lstm_stream.v1 import stream_pb2 as pb
from server.config import DEFAULT_MODEL

MiB = 1024 * 1024


class Abuser(threading.Thread):
    """A PredictStream client that sends `message` again and again and never reads an answer."""

    def __init__(self, address: str, message: pb.PredictRequest, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.address, self.message, self.stop = address, message, stop
        self.calls = 0
        self.codes: dict[str, int] = {}

    def run(self) -> None:
        payload = self.message.SerializeToString()
        with grpc.insecure_channel(self.address) as channel:
            method = channel.stream_stream("/lstm_stream.v1.StreamInference/PredictStream")
            while not self.stop.is_set():
                def send() -> Iterator[bytes]:
                    while not self.stop.is_set():
                        yield payload
                call = method(send(), timeout=3600)  # the answers are never read
                self.calls += 1
                while not call.done() and not self.stop.wait(0.1):
                    pass
                code = str(call.code()) if call.done() else "open at the end"
                call.cancel()
                self.codes[code] = self.codes.get(code, 0) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    parser.add_argument("--sample-s", type=float, default=5, help="seconds between memory samples")
    parser.add_argument("--streams", type=int, default=32, help="lstm-loadtest sensors (default 32)")
    parser.add_argument("--chunk", type=int, default=20, help="timesteps per chunk (default 20)")
    parser.add_argument("--abusers", type=int, default=4, help="non-reading abusive connections (default 4)")
    parser.add_argument("--abuse", choices=("both", "huge", "near", "none"), default="both",
                        help="which abusers: 16 MiB messages, ~60 KB ones, both alternating, or none")
    parser.add_argument("--server-arg", action="append", default=[], help="extra lstm-serve argument (repeat)")
    parser.add_argument("--json", type=Path, help="write the samples and summary as JSON")
    args = parser.parse_args()

    redis = RedisServer(appendonly=False)
    server = ServerProcess(redis.url, DEFAULT_MODEL, *args.server_arg, metrics_port=0, ready_timeout_s=180)
    address = server.address
    stop = threading.Event()
    abusers: list[Abuser] = []
    samples: list[dict[str, float]] = []
    try:
        time.sleep(5)  # background XLA compilation of the warm-up shapes
        report_path = Path(tempfile.mkstemp(prefix="soak-load-", suffix=".json")[1])
        load = subprocess.Popen(
            [sys.executable, "-m", "loadtest", "--target", address, "--streams", str(args.streams),
             "--chunk", str(args.chunk), "--api", "stream", "--duration", str(args.duration), "--warmup", "1",
             "--json", str(report_path), "--no-progress"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        baseline = server.rss_mib()
        huge = pb.PredictRequest(stream_id="abuse-huge", values=np.ones(4 * MiB, np.float32), timesteps=1)
        near = pb.PredictRequest(stream_id="abuse-near", values=np.ones(15_000, np.float32), timesteps=1)
        kinds = {"both": [huge, near], "huge": [huge], "near": [near], "none": []}[args.abuse]
        abusers = [Abuser(address, kinds[i % len(kinds)], stop) for i in range(args.abusers if kinds else 0)]
        for abuser in abusers:
            abuser.start()
        started = time.monotonic()
        print(f"{'t (s)':>7} {'server RSS (MiB)':>17} {'abuser calls':>13}")
        print(f"{0:>7.0f} {baseline:>17.0f} {0:>13}  (before the abusers)")
        while load.poll() is None:
            time.sleep(args.sample_s)
            sample = {"t_s": round(time.monotonic() - started, 1), "rss_mib": round(server.rss_mib(), 1),
                      "abuser_calls": sum(a.calls for a in abusers)}
            samples.append(sample)
            print(f"{sample['t_s']:>7.0f} {sample['rss_mib']:>17.0f} {sample['abuser_calls']:>13}", flush=True)
        stop.set()
        for abuser in abusers:
            abuser.join(30)
        report = json.loads(report_path.read_text()) if report_path.stat().st_size else {}
        rss = [s["rss_mib"] for s in samples] or [baseline]
        summary = {
            "duration_s": args.duration, "baseline_rss_mib": round(baseline, 1), "min_rss_mib": min(rss),
            "max_rss_mib": max(rss), "last_rss_mib": rss[-1], "server_alive": server.process.poll() is None,
            "abuser_outcomes": [a.codes for a in abusers],
            "load": {key: report.get(key) for key in ("chunks", "chunks_per_s", "latency_ms", "errors",
                                                      "errors_total", "retries", "failed_chunks")},
            "loadtest_exit_code": load.returncode,
        }
        print(json.dumps(summary, indent=2, default=str))
        if load.returncode not in (0, None):
            print(load.stderr.read()[-2000:] if load.stderr else "", file=sys.stderr)
        if args.json:
            args.json.write_text(json.dumps({"samples": samples, "summary": summary}, indent=2, default=str))
    finally:
        stop.set()
        server.stop()
        redis.stop()


if __name__ == "__main__":
    main()
