"""Models and versions (issue 25): what a loaded version costs, and what a replay from a window of inputs costs.

    python -m bench.models                        # the four parts, about 7 minutes
    python -m bench.models --quick                # one round of each, shorter loads, about 4 minutes
    python -m bench.models --parts history,replay # some parts only: load, throughput, history, replay

Every server here serves the shipped default model (server/model/default.keras: 2 x LSTM(64) + Dense(1), one
feature) from a `--model-repository` of copies, with the shipped defaults (XLA on) unless a row says otherwise,
each on its own fresh Redis (`appendfsync everysec`, as the server's private Redis and docker-compose.yml ship it).

- load:       one model with the default model as versions 1..4, served with `--version-policy latest:1` (one
              version loaded) and `all` (four), alternating, fresh server each time; `--xla false` too unless
              --quick. Per start: the seconds of each "model loaded" log line (load, self-check, tracing: before
              the port opens), the seconds until the health check says SERVING, the XLA warm-up compiles that
              follow in the background ("compiled" lines: count, seconds, when the last one ended), and the
              server's RSS when SERVING and once those compiles are done. Memory per extra version =
              (RSS with 4 - RSS with 1) / 3.
- throughput: the same closed-loop load (`--streams` PredictStream calls x 20 timesteps, one chunk in flight each)
              against A, a server with one model, B, a server with four models (copies of the default model under
              four names) with the streams spread evenly over them, and C, server B with every stream on one
              model. Both servers run for the whole part; rows interleave (A, B, C, then B, C, A, then C, A, B).
              Figures: chunks/s; CPU microseconds per chunk of the server's process tree and its Redis (from
              /proc, so the figure holds however busy the shared machine is); chunks per model call and the
              NumPy twin's share of the calls (the server's /metrics), which say why the CPU moves.
- history:    for `--history-timesteps` 0, 64, 256, 1024 (`--xla false`: only the record is looked at), 8
              streams of 2,048 timesteps in chunks of 20, then STRLEN and MEMORY USAGE of each stream's key.
- replay:     offline, the server's NumPy twin of the default model (server/model/numpy_twin.py, checked against
              Keras when it is built): sensor sequences from sensorsim (seeds no training used), the state after
              L steps from the whole sequence against the state rebuilt from zero on the last N inputs (what
              `--on-retired-version replay` does with `--history-timesteps N`), then the outputs of the next K
              steps from each: max abs and RMS error, relative to the outputs' RMS and beside the model's own
              forecast error (RMS of output[t] - x[t+1]) over those steps.

Figures go to stdout as tables and to bench/results/models.json (--json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.perf_analyzer import cpu_seconds
from devkit import ROOT
from devkit.metrics import scrape_port, value
from devkit.processes import RedisServer, ServerProcess, wait_until
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc as pb_grpc
from server.config import DEFAULT_MODEL

PARTS = ("load", "throughput", "history", "replay")
VERSIONS = 4
MODELS = 4
HISTORY = (0, 64, 256, 1024)
WINDOWS = (0, 16, 64, 256, 1024)  # replay windows N; 0: zero state (what `reset` gives), and the whole sequence
SHIPPED_APPENDFSYNC = "everysec"
# Seeds of the replay part's sensors: far from the training (0-499) and validation sensors.
REPLAY_SEED = 900_000


# ---- shared: a repository, a server on it, its log ----

def make_repository(root: Path, models: int, versions: int, model_file: Path = DEFAULT_MODEL) -> Path:
    """root/m<i>/<v>/model.keras for i < models, v = 1..versions: copies of one model file."""
    for m in range(models):
        for v in range(1, versions + 1):
            folder = root / f"m{m}" / str(v)
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(model_file, folder / "model.keras")
    return root


def log_entries(log: str, message: str) -> list[dict[str, Any]]:
    """The JSON log lines whose msg is `message`."""
    entries = []
    for line in log.splitlines():
        if f'"{message}"' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") == message:
            entries.append(entry)
    return entries


def log_time(entry: dict[str, Any]) -> float:
    """A log line's "ts" (UTC, milliseconds) as Unix seconds."""
    return datetime.strptime(entry["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


class Served:
    """A server on a repository with its own Redis; `cpu()` is the CPU seconds of both, `stop()` ends both."""

    def __init__(self, repository: Path, *flags: str) -> None:
        self.redis = RedisServer(appendfsync=SHIPPED_APPENDFSYNC)
        self.started = time.time()
        try:
            self.server = ServerProcess(self.redis.url, DEFAULT_MODEL, "--model-repository", str(repository),
                                        *flags, ready_timeout_s=300)
        except Exception:
            self.redis.stop()
            raise
        self.ready_s = time.time() - self.started

    def cpu(self) -> float:
        assert self.redis.process is not None
        return cpu_seconds([self.server.process.pid, self.redis.process.pid])

    def counters(self) -> dict[str, float]:
        """CPU seconds of the server and its Redis, and the model calls the server counted by path."""
        samples = scrape_port(self.server.metrics_port)
        return {"cpu": self.cpu(), **{f"{path}_calls": value(samples, "lstm_serve_model_calls_total", path=path)
                                      for path in ("numpy", "tensorflow")}}

    def compiles_settled(self, quiet_s: float = 4.0, timeout_s: float = 300) -> list[dict[str, Any]]:
        """The "compiled" lines once none came for quiet_s (the warm-up compiles run in the background)."""
        seen = [-1, time.monotonic()]

        def quiet() -> bool:
            count = len(log_entries(self.server.log(), "compiled"))
            if count != seen[0]:
                seen[:] = [count, time.monotonic()]
            return time.monotonic() - seen[1] >= quiet_s

        wait_until(quiet, timeout_s, "the warm-up compiles to end", interval_s=0.25)
        return log_entries(self.server.log(), "compiled")

    def stop(self) -> None:
        self.server.stop()
        self.redis.stop()


# ---- part 1: load and warm-up time, memory per version ----

def load_row(repository: Path, versions_loaded: int, xla: bool) -> dict[str, Any]:
    policy = "all" if versions_loaded > 1 else "latest:1"
    served = Served(repository, "--version-policy", policy, *(() if xla else ("--xla", "false")))
    try:
        rss_ready = served.server.rss_mib()
        compiled = served.compiles_settled() if xla else []
        rss_warm = served.server.rss_mib()
        loaded = log_entries(served.server.log(), "model loaded")
    finally:
        served.stop()
    if len(loaded) != versions_loaded:
        raise RuntimeError(f"expected {versions_loaded} 'model loaded' lines, found {len(loaded)}")
    return {
        "versions_loaded": versions_loaded, "xla": xla, "policy": policy,
        "load_s": [entry["seconds"] for entry in sorted(loaded, key=lambda e: e["version"])],
        "ready_s": served.ready_s,
        "compiles": len(compiled), "compile_s": sum(entry["seconds"] for entry in compiled),
        "warm_s": (max(log_time(e) for e in compiled) - served.started) if compiled else served.ready_s,
        "rss_ready_mib": rss_ready, "rss_warm_mib": rss_warm,
    }


def per_extra_version(rows: list[dict[str, Any]], key: str, versions: int = VERSIONS) -> float:
    """(median of `key` with `versions` loaded - median with 1) / (versions - 1)."""
    one = statistics.median(r[key] for r in rows if r["versions_loaded"] == 1)
    many = statistics.median(r[key] for r in rows if r["versions_loaded"] == versions)
    return (many - one) / (versions - 1)


def load_part(rounds: int, with_no_xla: bool, workdir: Path) -> dict[str, Any]:
    repository = make_repository(workdir / "load", 1, VERSIONS)
    rows = []
    settings = [True, False] if with_no_xla else [True]
    for xla in settings:
        for round_ in range(rounds if xla else 1):
            order = (1, VERSIONS) if round_ % 2 == 0 else (VERSIONS, 1)
            for count in order:
                row = load_row(repository, count, xla)
                rows.append(row)
                print(json.dumps({"part": "load", **row}), flush=True)
    return {"rows": rows, "summary": load_summary(rows)}


def load_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over the rounds, for XLA on and off."""
    summary = []
    for xla in dict.fromkeys(r["xla"] for r in rows):
        these = [r for r in rows if r["xla"] == xla]
        summary.append({
            "xla": xla,
            # Each version's seconds, by its place in the load order: later ones load while the earlier
            # ones' XLA shapes compile in the background.
            "load_s": {n: [statistics.median(r["load_s"][i] for r in these if r["versions_loaded"] == n)
                           for i in range(n)] for n in (1, VERSIONS)},
            "load_s_range": [min(s for r in these for s in r["load_s"]), max(s for r in these for s in r["load_s"])],
            "ready_s": {n: statistics.median(r["ready_s"] for r in these if r["versions_loaded"] == n)
                        for n in (1, VERSIONS)},
            "warm_s": {n: statistics.median(r["warm_s"] for r in these if r["versions_loaded"] == n)
                       for n in (1, VERSIONS)},
            "compiles": {n: statistics.median(r["compiles"] for r in these if r["versions_loaded"] == n)
                         for n in (1, VERSIONS)},
            "compile_s_per_version": {n: statistics.median(r["compile_s"] / n for r in these
                                                           if r["versions_loaded"] == n) for n in (1, VERSIONS)},
            "rss_ready_mib": {n: statistics.median(r["rss_ready_mib"] for r in these if r["versions_loaded"] == n)
                              for n in (1, VERSIONS)},
            "rss_warm_mib": {n: statistics.median(r["rss_warm_mib"] for r in these if r["versions_loaded"] == n)
                             for n in (1, VERSIONS)},
            "mib_per_extra_version_ready": per_extra_version(these, "rss_ready_mib"),
            "mib_per_extra_version_warm": per_extra_version(these, "rss_warm_mib"),
        })
    return summary


# ---- part 2: chunks/s with one and with four models ----

@dataclass
class LoadStats:
    chunks: int = 0
    per_model: dict[str, int] = field(default_factory=dict)


class ModelLoad:
    """`streams` PredictStream calls, stream i on models[i % len(models)], one chunk of `timesteps` in flight
    each (the next sent once the last is answered), offsets checked on every answer."""

    CHANNELS = 4

    def __init__(self, target: str, streams: int, timesteps: int, models: list[str], seed: int = 0) -> None:
        self.target, self.streams, self.timesteps, self.models = target, streams, timesteps, models
        rng = np.random.default_rng(seed)
        # Values drawn once: the generator's cost per chunk stays a few microseconds.
        self.blocks = [rng.normal(0, 1, size=timesteps).astype(np.float32).tolist() for _ in range(16)]
        self.prefix = f"models-{uuid.uuid4().hex[:6]}"

    def run(self, warmup_s: float, duration_s: float, counters: Callable[[], dict[str, float]]) -> dict[str, Any]:
        """Figures of the `duration_s` after `warmup_s`; `counters` (CPU seconds, model calls by path) is read
        at both ends of that window."""
        return asyncio.run(self._run(warmup_s, duration_s, counters))

    async def _run(self, warmup_s: float, duration_s: float, counters: Callable[[], dict[str, float]]
                   ) -> dict[str, Any]:
        stats, stop = LoadStats(), asyncio.Event()
        channels = [grpc.aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(self.CHANNELS)]
        stubs = [pb_grpc.StreamInferenceStub(channel) for channel in channels]
        tasks = [asyncio.create_task(self._stream(stubs[i % len(stubs)], f"{self.prefix}-{i}",
                                                  self.models[i % len(self.models)], stats, stop))
                 for i in range(self.streams)]
        await asyncio.sleep(warmup_s)
        before, per_model, first, started = stats.chunks, dict(stats.per_model), counters(), time.monotonic()
        await asyncio.sleep(duration_s)
        chunks, last, elapsed = stats.chunks - before, counters(), time.monotonic() - started
        used = {name: last[name] - first[name] for name in first}
        calls = used["numpy_calls"] + used["tensorflow_calls"]
        per_model = {m: stats.per_model[m] - per_model.get(m, 0) for m in stats.per_model}
        stop.set()
        await asyncio.gather(*tasks)
        for channel in channels:
            await channel.close()
        return {"chunks": chunks, "seconds": elapsed, "chunks_per_s": chunks / elapsed,
                "cpu_us_per_chunk": 1e6 * used["cpu"] / chunks if chunks else None, "per_model": per_model,
                "chunks_per_model_call": chunks / calls if calls else None,
                "numpy_share": used["numpy_calls"] / calls if calls else None}

    async def _stream(self, stub: pb_grpc.StreamInferenceStub, stream_id: str, model: str, stats: LoadStats,
                      stop: asyncio.Event) -> None:
        call = stub.PredictStream()
        offset, tick = 0, 0
        try:
            while not stop.is_set():
                await call.write(pb.PredictRequest(
                    stream_id=stream_id, model=model, values=self.blocks[tick % len(self.blocks)],
                    timesteps=self.timesteps, start_offset=offset, reset=offset == 0))
                response = await call.read()
                if response is grpc.aio.EOF or response.HasField("error") or \
                        response.offset != offset + self.timesteps:
                    raise RuntimeError(f"stream {stream_id}: unexpected answer {response}")
                offset += self.timesteps
                tick += 1
                stats.chunks += 1
                stats.per_model[model] = stats.per_model.get(model, 0) + 1
        finally:
            await call.done_writing()
            call.cancel()


def throughput_part(rounds: int, streams: int, timesteps: int, duration_s: float, workdir: Path) -> dict[str, Any]:
    one = Served(make_repository(workdir / "one", 1, 1))
    try:
        four = Served(make_repository(workdir / "four", MODELS, 1))
    except Exception:
        one.stop()
        raise
    all_four = [f"m{m}" for m in range(MODELS)]
    setups = {"A: 1 model": (one, ["m0"]), f"B: {MODELS} models, spread": (four, all_four),
              f"C: {MODELS} models, all on m0": (four, ["m0"])}
    rows = []
    try:
        one.compiles_settled()
        four.compiles_settled()
        rss = {"one_model_warm": one.server.rss_mib(), "four_models_warm": four.server.rss_mib()}
        for served, models in setups.values():  # the shapes this traffic needs compile here
            ModelLoad(served.server.address, streams, timesteps, models).run(0.5, 8.0, served.counters)
        names = list(setups)
        for round_ in range(rounds):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:  # each setup first once
                served, models = setups[name]
                row = ModelLoad(served.server.address, streams, timesteps, models).run(2.0, duration_s,
                                                                                       served.counters)
                row = {"setup": name, "round": round_, "streams": streams, "timesteps": timesteps, **row}
                rows.append(row)
                print(json.dumps({"part": "throughput", **row}), flush=True)
        compiled_while_measuring = {"one": len(log_entries(one.server.log(), "compiled")),
                                    "four": len(log_entries(four.server.log(), "compiled"))}
        rss.update(one_model_after=one.server.rss_mib(), four_models_after=four.server.rss_mib())
    finally:
        one.stop()
        four.stop()
    summary = []
    for name in setups:
        these = [r for r in rows if r["setup"] == name]
        rates, cpus = [r["chunks_per_s"] for r in these], [r["cpu_us_per_chunk"] for r in these]
        summary.append({"setup": name, "chunks_per_s": statistics.median(rates), "chunks_per_s_range": [
            min(rates), max(rates)], "cpu_us_per_chunk": statistics.median(cpus),
            "cpu_us_per_chunk_range": [min(cpus), max(cpus)],
            "chunks_per_model_call": statistics.median(r["chunks_per_model_call"] for r in these),
            "numpy_share": statistics.median(r["numpy_share"] for r in these)})
    # The RSS of each server once its warm-up compiles ended, and after the part's loads (more shapes compiled).
    rss["mib_per_extra_model_warm"] = (rss["four_models_warm"] - rss["one_model_warm"]) / (MODELS - 1)
    return {"rows": rows, "summary": summary, "compiled_lines": compiled_while_measuring, "rss_mib": rss}


# ---- part 3: history bytes per stream ----

def history_row(history: int, streams: int, timesteps_total: int, chunk: int, workdir: Path) -> dict[str, Any]:
    served = Served(make_repository(workdir / f"history-{history}", 1, 1),
                    "--history-timesteps", str(history), "--xla", "false")
    try:
        prefix = f"history-{uuid.uuid4().hex[:6]}"
        rng = np.random.default_rng(history)
        for s in range(streams):
            for offset in range(0, timesteps_total, chunk):
                reply = served.server.stub.Predict(pb.PredictRequest(
                    stream_id=f"{prefix}-{s}", model="m0", values=rng.normal(size=chunk).astype(np.float32),
                    timesteps=chunk, start_offset=offset, reset=offset == 0), timeout=30)
                assert reply.offset == offset + chunk, reply
        client = served.redis.client()
        keys = list(client.scan_iter(match=f"lstm:@m0:{{{prefix}-*", count=1000))
        record = [client.strlen(key) for key in keys]
        memory = [client.memory_usage(key) or 0 for key in keys]
        client.close()
    finally:
        served.stop()
    if len(keys) != streams:
        raise RuntimeError(f"expected {streams} stream keys, found {len(keys)}")
    return {"history_timesteps": history, "streams": streams, "timesteps_passed": timesteps_total,
            "chunk_timesteps": chunk, "record_bytes": statistics.mean(record), "redis_bytes": statistics.mean(memory)}


def history_part(streams: int, workdir: Path) -> dict[str, Any]:
    rows = []
    for history in HISTORY:
        row = history_row(history, streams, 2048, 20, workdir)
        rows.append(row)
        print(json.dumps({"part": "history", **row}), flush=True)
    base = rows[0]
    for row in rows:
        row["record_bytes_added"] = row["record_bytes"] - base["record_bytes"]
        row["redis_bytes_added"] = row["redis_bytes"] - base["redis_bytes"]
        row["record_bytes_added_per_timestep"] = (row["record_bytes_added"] / row["history_timesteps"]
                                                  if row["history_timesteps"] else None)
    return {"rows": rows}


# ---- part 4: replay approximation error ----

Run = Callable[[list[np.ndarray], np.ndarray], tuple[list[np.ndarray], np.ndarray]]


def replay_errors(run: Run, state_size: int, sequences: np.ndarray, length: int, windows: Iterable[int],
                  after: int) -> list[dict[str, Any]]:
    """For each window N, the outputs of steps length .. length + after - 1 from the state rebuilt from zero on
    the last N inputs before `length`, against those from the state after the whole sequence.

    `run` is a runner's run (chunks of B streams, their states [B, state_size]); `sequences` is
    float32 [B, length + after + 1, features] (one step more than used: the forecast's target)."""
    batch = sequences.shape[0]
    zeros = np.zeros((batch, state_size), np.float32)
    _, exact_state = run(list(sequences[:, :length]), zeros)
    following = list(sequences[:, length:length + after])
    exact, _ = run(following, exact_state)
    exact_y = np.stack(exact)
    target = sequences[:, length + 1:length + after + 1, :exact_y.shape[-1]]
    scale = float(np.sqrt(np.mean(exact_y ** 2)))
    forecast_rms = float(np.sqrt(np.mean((exact_y - target) ** 2)))
    rows = []
    for n in windows:
        if n >= length:
            state = exact_state
        elif n == 0:
            state = zeros
        else:
            _, state = run(list(sequences[:, length - n:length]), zeros)
        got = np.stack(run(following, state)[0])
        diff = got - exact_y
        per_sequence_max = np.abs(diff).reshape(batch, -1).max(axis=1)
        rms = float(np.sqrt(np.mean(diff ** 2)))
        first = float(np.abs(diff[:, 0]).max())
        last = float(np.abs(diff[:, -1]).max())
        rows.append({
            "window": min(n, length), "whole_sequence": n >= length, "length": length, "after": after,
            "sequences": batch, "max_abs": float(per_sequence_max.max()),
            "mean_of_max_abs": float(per_sequence_max.mean()), "rms": rms, "relative_rms": rms / scale,
            "max_abs_first_step": first, "max_abs_last_step": last,
            "state_max_abs": float(np.abs(state - exact_state).max()),
            "outputs_rms": scale, "forecast_rms": forecast_rms,
        })
    return rows


def sensor_sequences(count: int, length: int, seed: int = REPLAY_SEED) -> np.ndarray:
    from sensorsim import generate

    return np.stack([generate(seed + i, length) for i in range(count)]).astype(np.float32)


def replay_part(sequences: int, length: int, after: int) -> dict[str, Any]:
    from server.model.numpy_twin import NumpyTwin
    from server.model.runner import load_keras_model

    twin = NumpyTwin(load_keras_model(DEFAULT_MODEL))
    state_size = 4 * 64  # h and c of two LSTM(64)
    data = sensor_sequences(sequences, length + after + 1)
    windows = [*WINDOWS, length]
    rows = replay_errors(twin.run, state_size, data, length, windows, after)
    for row in rows:
        print(json.dumps({"part": "replay", **row}), flush=True)
    return {"rows": rows, "model": "server/model/default.keras via its NumPy twin",
            "seeds": [REPLAY_SEED, REPLAY_SEED + sequences - 1]}


# ---- the run and its tables ----

def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "loadavg": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of each part, 8 s loads, no --xla false")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the load and throughput parts (3)")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds of each load (20)")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--timesteps", type=int, default=20)
    parser.add_argument("--length", type=int, default=4096, help="replay: steps before the switch (L)")
    parser.add_argument("--after", type=int, default=100, help="replay: steps compared after the switch (K)")
    parser.add_argument("--sequences", type=int, default=32, help="replay: sensors")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "models.json")
    args = parser.parse_args(argv)
    parts = [part for part in args.parts.split(",") if part]
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}")
    rounds = args.rounds or (1 if args.quick else 3)
    duration = args.duration or (8.0 if args.quick else 20.0)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "tool": "bench.models",
                               "quick": args.quick, "machine_at_start": machine()}
    workdir = Path(tempfile.mkdtemp(prefix="bench-models-"))
    try:
        if "replay" in parts:
            results["replay"] = replay_part(args.sequences, args.length, args.after)
        if "history" in parts:
            results["history"] = history_part(8, workdir)
        if "load" in parts:
            results["load"] = load_part(rounds, not args.quick, workdir)
        if "throughput" in parts:
            results["throughput"] = throughput_part(rounds, args.streams, args.timesteps, duration, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["machine_at_end"] = machine()
    print_tables(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwritten to {args.json}")
    return 0


def print_tables(results: dict[str, Any]) -> None:
    start, end = results["machine_at_start"], results["machine_at_end"]
    print(f"\n{results['date']}, {start['cpus']} cores; load average {start['loadavg'][0]:.2f} at the start, "
          f"{end['loadavg'][0]:.2f} at the end")
    if "load" in results:
        print("\nLoad and warm-up, one model, the default model as versions 1..4 (medians)")
        print("| XLA | s per version load, 1 / 4 loaded (all rows' range) | SERVING after s (1 / 4) | "
              "warm-up compiles done after s (1 / 4) | "
              "compile s per version (1 / 4) | RSS MiB ready (1 / 4) | RSS MiB warm (1 / 4) | "
              "MiB per extra version (ready / warm) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for s in results["load"]["summary"]:
            each = ", ".join(f"{x:.1f}" for x in s["load_s"][VERSIONS])
            print(f"| {'on' if s['xla'] else 'off'} | {s['load_s'][1][0]:.1f} / {each} "
                  f"({s['load_s_range'][0]:.1f}-{s['load_s_range'][1]:.1f}) | "
                  f"{s['ready_s'][1]:.1f} / {s['ready_s'][VERSIONS]:.1f} | "
                  f"{s['warm_s'][1]:.1f} / {s['warm_s'][VERSIONS]:.1f} | "
                  f"{s['compile_s_per_version'][1]:.1f} / {s['compile_s_per_version'][VERSIONS]:.1f} | "
                  f"{s['rss_ready_mib'][1]:.0f} / {s['rss_ready_mib'][VERSIONS]:.0f} | "
                  f"{s['rss_warm_mib'][1]:.0f} / {s['rss_warm_mib'][VERSIONS]:.0f} | "
                  f"{s['mib_per_extra_version_ready']:.1f} / {s['mib_per_extra_version_warm']:.1f} |")
    if "throughput" in results:
        rows = results["throughput"]["rows"]
        print(f"\nThe same load, {rows[0]['streams']} streams x {rows[0]['timesteps']} timesteps, "
              "PredictStream, one chunk in flight each (medians, range)")
        print("| setup | chunks/s | range | CPU us/chunk (server + Redis) | range | chunks per model call | "
              "NumPy twin's share of calls |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for s in results["throughput"]["summary"]:
            print(f"| {s['setup']} | {s['chunks_per_s']:,.0f} | {s['chunks_per_s_range'][0]:,.0f}-"
                  f"{s['chunks_per_s_range'][1]:,.0f} | {s['cpu_us_per_chunk']:,.0f} | "
                  f"{s['cpu_us_per_chunk_range'][0]:,.0f}-{s['cpu_us_per_chunk_range'][1]:,.0f} | "
                  f"{s['chunks_per_model_call']:.1f} | {s['numpy_share']:.0%} |")
        rss = results["throughput"].get("rss_mib")
        if rss:
            print(f"RSS MiB once warm: 1 model {rss['one_model_warm']:.0f}, "
                  f"{MODELS} models {rss['four_models_warm']:.0f} "
                  f"({rss['mib_per_extra_model_warm']:.1f} per extra model); after the loads: "
                  f"{rss['one_model_after']:.0f} and {rss['four_models_after']:.0f}")
    if "history" in results:
        print("\nHistory bytes per stream (record after 2,048 timesteps, chunks of 20)")
        print("| --history-timesteps | record bytes (STRLEN) | added | Redis bytes (MEMORY USAGE) | added |")
        print("|---:|---:|---:|---:|---:|")
        for r in results["history"]["rows"]:
            print(f"| {r['history_timesteps']} | {r['record_bytes']:,.0f} | {r['record_bytes_added']:,.0f} | "
                  f"{r['redis_bytes']:,.0f} | {r['redis_bytes_added']:,.0f} |")
    if "replay" in results:
        rows = results["replay"]["rows"]
        r0 = rows[0]
        print(f"\nReplay from the last N inputs, default model: {r0['sequences']} sensors, state after "
              f"L = {r0['length']} steps, outputs of the next K = {r0['after']} steps compared; outputs' RMS "
              f"{r0['outputs_rms']:.3f}, the model's own forecast error (RMS) {r0['forecast_rms']:.3f}")
        print("| N | max abs error | RMS error | RMS / outputs' RMS | RMS / forecast error | max abs, first step | "
              "max abs, step K | state max abs |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            name = "whole sequence" if r["whole_sequence"] else ("0 (zero state)" if r["window"] == 0
                                                                 else str(r["window"]))
            print(f"| {name} | {r['max_abs']:.2e} | {r['rms']:.2e} | {r['relative_rms']:.2e} | "
                  f"{r['rms'] / r['forecast_rms']:.2e} | {r['max_abs_first_step']:.2e} | "
                  f"{r['max_abs_last_step']:.2e} | {r['state_max_abs']:.2e} |")


if __name__ == "__main__":
    raise SystemExit(main())
