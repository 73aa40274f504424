"""Triton's own load generator against this server and against Triton, in one run, one server at a time.

    python -m bench.perf_analyzer                 # about 6 minutes with the Triton peer set up
    python -m bench.perf_analyzer --quick         # the streaming T=20 mode only
    python -m bench.perf_analyzer --servers lstm-serve,triton --modes unary,http   # gRPC vs HTTP, ~2 minutes

Servers, each with the shipped default model shape (2 x LSTM(64) + Dense(1), one feature):
- lstm-serve: this server, state in its own fresh Redis (append-only file on, `appendfsync everysec` as
              docker-compose.yml and the server's private Redis ship it; `--appendfsync always` for
              one fsync per batch: docs/deploy.md says what each can lose), `--workers` as given.
- ceiling:    the same with `--identity-model`: the same gRPC, batching and Redis work, no model call.
- floor:      this server's Triton-protocol front end alone (bench/peers/grpc_floor.py): grpc.aio, the
              servicer and its conversions, every answer ready at once; what Python gRPC costs here
              (one process, whatever --workers says).
- triton:     Triton 2.51's sequence batcher with the python backend, state in process memory
              (../shared/peers/triton: set up with its setup.sh; skipped with a note when it is not).

Modes are perf_analyzer's (`--sequence-length 20`, sequences of 20 requests, ids from perf_analyzer):
unary and `--streaming` at 64 concurrent sequences with T=20 timesteps per request, T=1 streaming, and
one sequence (latency); and "http": the unary T=20 load over KServe v2 REST (`-i http`, binary tensors) on
the HTTP port of this server and of Triton (the floor has no HTTP port: skipped there). Each ratio is
measured in this run. Besides throughput and latency it reports the CPU each side spends per inference:
CPU seconds of the server's process tree (and of its Redis) over the requests the server counted (its
ModelStatistics, or its metrics), so the figure does not depend on how busy the rest of the machine was.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from devkit import ROOT
from devkit.metrics import scrape_port, value
from devkit.peers import TRITON_SETUP, perf_analyzer_command, triton_server_available
from devkit.processes import RedisServer, ServerProcess, free_port, wait_until
from server.config import DEFAULT_MODEL

TRITON_MODEL = "lstm"
SEQUENCE_LENGTH = 20
# This server's Redis as shipped: docker-compose.yml and the server's private Redis use everysec.
SHIPPED_APPENDFSYNC = "everysec"
RUN_TIMEOUT_S = 120  # Triton's streaming mode has hung at 64 sequences: a hung run is recorded, not waited on
SERVERS = ("lstm-serve", "ceiling", "floor", "triton")  # the side-by-side, in this order


@dataclass(frozen=True)
class Mode:
    name: str
    timesteps: int
    concurrency: int
    streaming: bool
    protocol: str = "grpc"  # perf_analyzer's -i: grpc, or http (KServe v2 REST)


MODES = (
    Mode("unary", 20, 64, False),
    Mode("streaming", 20, 64, True),
    Mode("T=1 unary", 1, 64, False),
    Mode("T=1 streaming", 1, 64, True),
    Mode("one sequence", 20, 1, False),
    Mode("http", 20, 64, False, "http"),
)


# ---- process CPU, from /proc ----

def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def stat_cpu_seconds(stat: Path) -> float:
    """User + system CPU seconds in a /proc/PID/stat or /proc/PID/task/TID/stat file; 0 once it is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(roots: list[int]) -> float:
    """User + system CPU seconds of these processes and all their descendants, alive now."""
    tree, total, todo = _children(), 0.0, list(roots)
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        total += stat_cpu_seconds(Path(f"/proc/{pid}/stat"))
    return total


# ---- the servers ----

class Server:
    """A server process answering the Triton protocol on `target`; `count()` reads its ModelStatistics, or,
    given `metrics_ports`, the answers its workers' /metrics counted. Started from `command` (the peers), or
    `ours`, an lstm-serve already started by devkit's ServerProcess."""

    def __init__(self, name: str, target: str, model: str | None, *, command: list[str] | None = None,
                 ours: ServerProcess | None = None, extra_pids: tuple[int, ...] = (),
                 metrics_ports: tuple[int, ...] = (), http_target: str = "") -> None:
        """`http_target`: host:port of its KServe v2 REST port ("": none)."""
        import tritonclient.grpc as triton_grpc  # only the benchmark needs tritonclient

        self.name, self.target, self.extra_pids, self.ours = name, target, extra_pids, ours
        self.http_target = http_target
        # With several worker processes each answers ModelStatistics for itself alone, so a count read
        # through the shared port is one worker's; each worker's /metrics port answers for that worker.
        self.metrics_ports = metrics_ports
        if ours is not None:
            self.process, self.log_name = ours.process, str(ours.log_path)
        else:
            assert command is not None, "a command or a started lstm-serve"
            with tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False) as log:
                self.log_name = log.name
                self.process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)
        self.model = model or model_name(target)
        self.client = triton_grpc.InferenceServerClient(target)

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"{name} exited; see {self.log_name}")
            try:
                return bool(self.client.is_model_ready(self.model, client_timeout=5))
            except Exception:  # not listening yet
                return False

        wait_until(ready, 180, f"{name} to serve {self.model}", interval_s=0.5)

    def count(self, field: str = "inference_count") -> int:
        """Requests served so far (or, with "execution_count", model calls), from ModelStatistics; requests
        from every worker's metrics when the server has them."""
        if self.metrics_ports and field == "inference_count":
            return sum(triton_answers(port) for port in self.metrics_ports)
        stats = self.client.get_inference_statistics(self.model, as_json=True)
        return sum(int(entry.get(field, 0)) for entry in stats.get("model_stats", []))

    def cpu(self) -> float:
        return cpu_seconds([self.process.pid, *self.extra_pids])

    def stop(self) -> None:
        self.client.close()
        if self.ours is not None:
            self.ours.stop()
            return
        try:  # the peers' scripts start children of their own: their whole session
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def triton_answers(metrics_port: int) -> int:
    """KServe v2 inferences one worker answered OK: ModelInfer calls and stream messages over gRPC, ModelInfer
    over HTTP."""
    samples = scrape_port(metrics_port)
    return int(sum(value(samples, "lstm_serve_requests_total", protocol=protocol, method=method, code="OK")
                   for protocol, method in (("triton", "ModelInfer"), ("triton", "ModelStreamInfer"),
                                            ("http", "ModelInfer"))))


def start_ours(name: str, workers: int, redis: RedisServer, extra: tuple[str, ...] = ()) -> Server:
    flags = ["--workers", str(workers), "--warmup-timesteps", "20,1",
             *(["--identity-model"] if name == "ceiling" else []), *extra]
    ours = ServerProcess(redis.url, DEFAULT_MODEL, *flags, ready_timeout_s=180)
    server = Server(name, ours.address, None, ours=ours, extra_pids=(redis.process.pid,),
                    metrics_ports=tuple(range(ours.metrics_port, ours.metrics_port + workers)),
                    http_target=ours.http_url.removeprefix("http://"))
    time.sleep(8)  # the warm-up shapes compile in the background; measure after
    return server


def start_floor() -> Server:
    port = free_port()
    # "default" is the model's alias in the Triton protocol (server/api/triton_convert.py's MODEL_ALIAS, not
    # imported: its protos and tritonclient's cannot share one process).
    return Server("floor", f"127.0.0.1:{port}", "default",
                  command=[sys.executable, "-m", "bench.peers.grpc_floor", "--port", str(port)])


def model_name(target: str) -> str:
    """This server names its model after the Keras model; ask it (GetModel) once it listens."""
    import grpc

    from lstm_stream.v1 import stream_pb2 as pb
    from lstm_stream.v1 import stream_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        reply = pb_grpc.StreamInferenceStub(channel).GetModel(pb.GetModelRequest(), timeout=180,
                                                               wait_for_ready=True)
    return str(reply.name)


def start_triton() -> Server:
    # Its ports are fixed by the peer's script (HTTP 8000, gRPC 8001): one Triton at a time.
    return Server("triton", "127.0.0.1:8001", TRITON_MODEL, command=["bash", str(TRITON_SETUP / "start_server.sh")],
                  http_target="127.0.0.1:8000")


# ---- one perf_analyzer run ----

# perf_analyzer's own default: the last three windows within 25 % of each other, else the run fails.
STABILITY_PERCENT = 25


def load_command(pa: list[str], server: Server, mode: Mode, interval_ms: int, trials: int,
                 stability: int = STABILITY_PERCENT) -> list[str]:
    """perf_analyzer loading `server` in `mode`: sequences of SEQUENCE_LENGTH requests."""
    target = server.http_target if mode.protocol == "http" else server.target
    command = [*pa, "-m", server.model, "-i", mode.protocol, "-u", target,
               "--shape", f"INPUT:{mode.timesteps},1", "--sequence-length", str(SEQUENCE_LENGTH),
               "--concurrency-range", f"{mode.concurrency}:{mode.concurrency}",
               "--measurement-interval", str(interval_ms), "--stability-percentage", str(stability),
               "--max-trials", str(trials)]
    return [*command, "--streaming"] if mode.streaming else command


def measure(pa: list[str], server: Server, mode: Mode, interval_ms: int, trials: int = 6,
            stability: int = STABILITY_PERCENT) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "pa.csv"
        command = [*load_command(pa, server, mode, interval_ms, trials, stability), "-f", str(report)]
        row: dict[str, Any] = {"server": server.name, **asdict(mode)}
        count, cpu, started = server.count(), server.cpu(), time.monotonic()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {**row, "failed": f"perf_analyzer did not finish within {RUN_TIMEOUT_S} s (hung)"}
        try:
            cpu_used, served = server.cpu() - cpu, server.count() - count
        except Exception:  # tritonclient raises its own types; any of them means the same here
            return {**row, "failed": "the server stopped answering during the run (crashed)"}
        if done.returncode != 0 or not report.is_file():
            return {**row, "failed": (done.stdout + done.stderr).strip().splitlines()[-1:] or "no output"}
        with report.open() as handle:
            result = next(csv.DictReader(handle))
        return {
            **row,
            "infer_per_s": float(result["Inferences/Second"]),
            "p50_ms": float(result["p50 latency"]) / 1000,
            "p99_ms": float(result["p99 latency"]) / 1000,
            "server_cpu_us_per_infer": 1e6 * cpu_used / served if served else None,
            "seconds": round(time.monotonic() - started, 1),
            "server_side_stats": "Server:" in done.stdout,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--workers", type=int, default=1, help="lstm-serve worker processes")
    parser.add_argument("--interval-ms", type=int, default=4000, help="perf_analyzer's measurement window")
    parser.add_argument("--quick", action="store_true", help="the streaming T=20 mode only")
    parser.add_argument("--modes", help="these modes only, by name, comma-separated (e.g. unary,http)")
    parser.add_argument("--stability", type=int, default=STABILITY_PERCENT,
                        help="perf_analyzer's --stability-percentage (wider on a busy shared machine)")
    parser.add_argument("--appendfsync", choices=("everysec", "always"), default=SHIPPED_APPENDFSYNC,
                        help="this server's Redis fsync policy (everysec: as shipped)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "perf_analyzer.json")
    parser.add_argument("--rows-to", type=Path, help=argparse.SUPPRESS)  # one server, in a child process
    args = parser.parse_args()
    modes = select_modes(args.modes or ("streaming" if args.quick else ",".join(m.name for m in MODES)))
    pa = perf_analyzer_command()
    if pa is None:
        sys.exit("perf_analyzer is not on this machine: set PERF_ANALYZER or run ../shared/peers/triton/setup.sh")
    if args.rows_to:
        rows = measure_server(pa, args.servers, args.workers, args.interval_ms, modes, args.appendfsync,
                              args.stability)
        args.rows_to.write_text(json.dumps(rows))
        return
    results = side_by_side(args.servers.split(","), args.workers, args.interval_ms,
                           ",".join(m.name for m in modes), args.appendfsync, args.stability)
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {args.json}")


def select_modes(names: str) -> list[Mode]:
    by_name = {m.name: m for m in MODES}
    unknown = [name for name in names.split(",") if name not in by_name]
    if unknown:
        sys.exit(f"no such mode: {', '.join(unknown)} (modes: {', '.join(by_name)})")
    return [by_name[name] for name in names.split(",")]


def side_by_side(servers: list[str], workers: int, interval_ms: int, modes: str,
                 appendfsync: str = SHIPPED_APPENDFSYNC, stability: int = STABILITY_PERCENT) -> dict[str, Any]:
    """Each server measured by a child process of its own: a crashing peer (Triton's streaming mode has
    segfaulted here) loses that server's remaining rows, not the run."""
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "tool": "perf_analyzer",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "workers": workers, "redis_appendfsync": appendfsync, "stability_percent": stability, "runs": [], "notes": [],
        # The machine may be shared: its load before the run, to read the figures by.
        "load_average": os.getloadavg(),
    }
    for name in servers:
        if name == "triton" and not triton_server_available():
            results["notes"].append("triton: not set up on this machine (../shared/peers/triton/setup.sh)")
            continue
        with tempfile.TemporaryDirectory() as folder:
            rows_file = Path(folder) / "rows.json"
            command = [sys.executable, "-m", "bench.perf_analyzer", "--servers", name, "--workers", str(workers),
                       "--interval-ms", str(interval_ms), "--appendfsync", appendfsync,
                       "--modes", modes, "--stability", str(stability), "--rows-to", str(rows_file)]
            done = subprocess.run(command, cwd=ROOT)
            if rows_file.is_file():
                results["runs"].extend(json.loads(rows_file.read_text()))
            else:
                results["notes"].append(f"{name}: the measuring process ended with {done.returncode}")
    return results


def measure_server(pa: list[str], name: str, workers: int, interval_ms: int, modes: list[Mode],
                   appendfsync: str = SHIPPED_APPENDFSYNC, stability: int = STABILITY_PERCENT) -> list[dict]:
    rows: list[dict[str, Any]] = []
    redis = RedisServer(appendfsync=appendfsync) if name not in ("triton", "floor") else None
    if redis is not None:
        server = start_ours(name, workers, redis)
    else:
        server = start_triton() if name == "triton" else start_floor()
    modes = [m for m in modes if m.protocol == "grpc" or server.http_target]  # the floor has no HTTP port
    try:
        if redis is not None:
            for mode in modes:  # a first pass compiles the shapes this traffic needs (README, "Compiled shapes")
                measure(pa, server, mode, 1000, trials=1)
        for mode in modes:
            row = measure(pa, server, mode, interval_ms, stability=stability)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if "failed" in row and name == "triton":  # a hung or crashed Triton serves nothing more: start it again
                server.stop()
                server = start_triton()
    finally:
        server.stop()
        if redis is not None:
            redis.stop()
    return rows


def against_triton(runs: dict[tuple[str, str], dict[str, Any]], mode: str, row: dict[str, Any]) -> str:
    """`row`'s ratio to Triton in `mode`: throughput, or for one sequence its p50 latency (lower is better)."""
    triton = runs.get(("triton", mode), {})
    if mode == "one sequence":
        return f"p50 {row['p50_ms'] / triton['p50_ms']:.2f}x" if "p50_ms" in row and "p50_ms" in triton else "-"
    # Against Triton's best mode at the same T: its streaming mode may hang or lose to unary.
    same_t = [r for (s, _), r in runs.items() if s == "triton" and r["timesteps"] == row.get("timesteps")
              and r["concurrency"] == row.get("concurrency") and "infer_per_s" in r]
    best = max((r["infer_per_s"] for r in same_t), default=None)
    peer = triton.get("infer_per_s") if not row.get("streaming") else best
    return "-" if not peer or "infer_per_s" not in row else f"{row['infer_per_s'] / peer:.2f}x"


def print_table(results: dict[str, Any]) -> None:
    runs = {(r["server"], r["name"]): r for r in results["runs"]}

    def cell(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    print(f"\nperf_analyzer, {results['machine']['cpus']} cores shared by server, Redis and load generator, "
          f"{results['date']}, lstm-serve --workers {results['workers']}, its Redis appendfsync "
          f"{results.get('redis_appendfsync', 'always')}")
    print("| mode | Triton infer/s | p50 ms | lstm-serve infer/s | p50 ms | x Triton | ceiling infer/s | of ceiling "
          "| floor infer/s | floor x Triton | CPU us/infer: Triton | lstm-serve | ceiling | floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode in dict.fromkeys(r["name"] for r in results["runs"]):
        triton, ours, ceiling, floor = (runs.get((s, mode), {}) for s in ("triton", "lstm-serve", "ceiling", "floor"))
        share = (f"{100 * ours['infer_per_s'] / ceiling['infer_per_s']:.0f} %"
                 if "infer_per_s" in ours and "infer_per_s" in ceiling else "-")
        cells = [mode, cell(triton.get("infer_per_s"), ",.0f") if "failed" not in triton else "hung/failed",
                 cell(triton.get("p50_ms"), ".2f"), cell(ours.get("infer_per_s"), ",.0f"),
                 cell(ours.get("p50_ms"), ".2f"),
                 against_triton(runs, mode, ours), cell(ceiling.get("infer_per_s"), ",.0f"), share,
                 cell(floor.get("infer_per_s"), ",.0f"), against_triton(runs, mode, floor),
                 *(cell(row.get("server_cpu_us_per_infer"), ",.0f") for row in (triton, ours, ceiling, floor))]
        print("| " + " | ".join(cells) + " |")
    print("x Triton: streaming modes against Triton's best mode at the same T and concurrency; "
          "one sequence: p50 ratio (lower is better). floor: the front end alone, every answer ready at once")
    for note in results["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
