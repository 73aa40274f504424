"""Soak mode (`--soak`): the server's own figures over a long run, and a verdict on whether it holds steady.

While the load runs, a background thread scrapes the server's Prometheus endpoint every `soak_interval_s`
and keeps one sample per scrape: the server's resident memory (`process_resident_memory_bytes`), its open
streams and calls in flight, Redis' used memory (`lstm_serve_redis_used_memory_bytes`), and the server's p50
and p99 latency over the interval since the previous scrape, from the deltas of the buckets of
`lstm_serve_request_seconds` (inference methods only: health checks would pull the median down). The load
tester's own p99 over the same interval comes from the engine's progress snapshots. A scrape that fails is
kept as a gap with its error; the run goes on.

Optionally a second thread churns short-lived streams beside the load (`soak_churn` every
`soak_churn_every_s`): each sends `soak_churn_chunks` chunks over the run's transport and is then reset,
so the server keeps creating and forgetting streams as it would in production.

The verdict, over the samples after the warm-up: the slope of a least-squares line through the RSS (MiB per
hour) against `max_memory_slope_mib_h`, and the p99 of the last fifth of the intervals over the p99 of the
first fifth (each from the summed bucket deltas of its intervals) against `max_p99_drift`. Fewer than
MIN_VERDICT_SAMPLES usable samples give no verdict rather than a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from loadtest.config import LoadConfig
from loadtest.recorder import Snapshot
from loadtest.sensors import Sensor
from loadtest.transports import ChunkFailed, StreamTransport, UnaryTransport, aio_channel
from lstm_stream.client.retry import RetryPolicy, retry_async
from lstm_stream.client.types import ModelInfo, call_metadata
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc as pb_grpc

MIB = 1024 * 1024
# Below this many usable samples after the warm-up a slope or a fifth is noise: no verdict, said so.
MIN_VERDICT_SAMPLES = 5
# The methods whose latency the verdict follows: a chunk's answer in either protocol.
INFERENCE_METHODS = frozenset({"Predict", "PredictStream", "ModelInfer", "ModelStreamInfer"})
RSS = "process_resident_memory_bytes"
OPEN_STREAMS = "lstm_serve_open_streams"
IN_FLIGHT_CALLS = "lstm_serve_in_flight_calls"
REDIS_MEMORY = "lstm_serve_redis_used_memory_bytes"
REQUEST_SECONDS = "lstm_serve_request_seconds"

Buckets = tuple[tuple[float, float], ...]  # (upper bound in seconds, cumulative count), +Inf last


@dataclass(frozen=True)
class Scrape:
    """What one scrape of /metrics says; None for a metric the endpoint does not export."""

    rss_bytes: float | None
    open_streams: float | None
    in_flight_calls: float | None
    redis_used_memory_bytes: float | None
    latency: Buckets  # lstm_serve_request_seconds summed over the inference methods; () when absent


def parse_metrics(text: str) -> Scrape:
    """The soak's figures from a Prometheus text exposition (gauges with labels summed over them)."""
    gauges: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in (RSS, OPEN_STREAMS, IN_FLIGHT_CALLS, REDIS_MEMORY):
            gauges[family.name] = sum(sample.value for sample in family.samples)
        elif family.name == REQUEST_SECONDS:
            for sample in family.samples:
                if sample.name.endswith("_bucket") and sample.labels.get("method") in INFERENCE_METHODS:
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return Scrape(gauges.get(RSS), gauges.get(OPEN_STREAMS), gauges.get(IN_FLIGHT_CALLS), gauges.get(REDIS_MEMORY),
                  tuple(sorted(buckets.items())))


def bucket_delta(before: Buckets, after: Buckets) -> Buckets:
    """The observations between two scrapes. A count that went down means the server restarted between them:
    then everything it counted since is new (Prometheus' rate() reads a reset the same way)."""
    if not before or [b for b, _ in before] != [b for b, _ in after]:
        return after
    delta = tuple((bound, count - old) for (bound, count), (_, old) in zip(after, before, strict=True))
    return after if any(count < 0 for _, count in delta) else delta


def bucket_sum(parts: Sequence[Buckets]) -> Buckets:
    """Several intervals' deltas as one (same bounds: one server's histogram)."""
    parts = [part for part in parts if part]
    if not parts:
        return ()
    return tuple((bound, sum(part[i][1] for part in parts)) for i, (bound, _) in enumerate(parts[0]))


def bucket_quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile (0..1) of cumulative buckets, in seconds, interpolated linearly within its bucket as
    Prometheus' histogram_quantile() does; in the +Inf bucket, the highest finite bound. None: no observation."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            inside = count - lower_count
            if inside <= 0:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / inside
        lower_bound, lower_count = bound, count
    return lower_bound


def memory_slope_mib_h(times_s: Sequence[float], values_bytes: Sequence[float]) -> float:
    """Slope of the least-squares line through (time, memory), in MiB per hour."""
    t_h = np.asarray(times_s, dtype=float) / 3600.0
    mib = np.asarray(values_bytes, dtype=float) / MIB
    slope, _ = np.polyfit(t_h, mib, 1)
    return float(slope)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 4)


def verdict(samples: Sequence[dict[str, Any]], deltas: Sequence[Buckets], warmup_s: float,
            max_memory_slope_mib_h: float, max_p99_drift: float) -> dict[str, Any]:
    """Judge the samples after the warm-up (the RSS read from then on, the latency of intervals begun from then
    on): memory slope and p99 drift, each with its figures.

    `deltas[i]` is the latency histogram of the interval ending at `samples[i]` (() for a gap or the first).
    `passed` is False when either figure is past its limit, None when there were too few samples for both."""
    after = [i for i, sample in enumerate(samples) if sample["t_s"] >= warmup_s]
    memory = _memory_growth(samples, after, max_memory_slope_mib_h)
    drift = _p99_drift(samples, deltas, after, warmup_s, max_p99_drift)
    failures = []
    if memory["passed"] is False:
        failures.append(f"server memory grew {memory['slope_mib_per_h']:,.1f} MiB/h (least squares over "
                        f"{memory['samples']} samples, {memory['first_mib']:,.1f} -> {memory['last_mib']:,.1f} MiB), "
                        f"past the limit of {max_memory_slope_mib_h:g} MiB/h")
    if drift["passed"] is False:
        failures.append(f"server p99 drifted x{drift['drift']:.2f} ({drift['first_p99_ms']:.3g} ms over the first "
                        f"fifth of the intervals -> {drift['last_p99_ms']:.3g} ms over the last), past the limit of "
                        f"x{max_p99_drift:g}")
    judged = [part["passed"] for part in (memory, drift) if part["passed"] is not None]
    return {"passed": all(judged) if judged else None, "failures": failures, "memory": memory, "p99_drift": drift}


def _memory_growth(samples: Sequence[dict[str, Any]], after: list[int], limit_mib_h: float) -> dict[str, Any]:
    """The server's RSS slope over the samples after the warm-up (and Redis', reported, not judged)."""
    with_rss = [i for i in after if samples[i]["rss_bytes"] is not None]
    memory: dict[str, Any] = {"samples": len(with_rss), "max_slope_mib_per_h": limit_mib_h, "slope_mib_per_h": None,
                              "first_mib": None, "last_mib": None, "passed": None}
    if len(with_rss) >= MIN_VERDICT_SAMPLES:
        rss = [samples[i]["rss_bytes"] for i in with_rss]
        slope = memory_slope_mib_h([samples[i]["t_s"] for i in with_rss], rss)
        memory.update(slope_mib_per_h=round(slope, 2), first_mib=round(rss[0] / MIB, 1),
                      last_mib=round(rss[-1] / MIB, 1), passed=slope <= limit_mib_h)
    redis = [i for i in after if samples[i]["redis_used_memory_bytes"] is not None]
    if len(redis) >= MIN_VERDICT_SAMPLES:
        memory["redis_slope_mib_per_h"] = round(memory_slope_mib_h(
            [samples[i]["t_s"] for i in redis], [samples[i]["redis_used_memory_bytes"] for i in redis]), 2)
    return memory


def _p99_drift(samples: Sequence[dict[str, Any]], deltas: Sequence[Buckets], after: list[int], warmup_s: float,
               limit: float) -> dict[str, Any]:
    """The server's p99 over the last fifth of the intervals over its p99 over the first fifth."""
    # An interval counts when it began after the warm-up: the one that straddles its end is partly warm-up.
    began: list[float] = []
    last_scrape = -math.inf
    for sample in samples:
        began.append(last_scrape)
        if sample.get("error") is None:
            last_scrape = sample["t_s"]
    counted = [i for i in after if began[i] >= warmup_s and deltas[i] and deltas[i][-1][1] > 0]
    drift: dict[str, Any] = {"intervals": len(counted), "max_drift": limit, "first_p99_ms": None,
                             "last_p99_ms": None, "drift": None, "passed": None}
    if len(counted) >= MIN_VERDICT_SAMPLES:
        fifth = max(1, len(counted) // 5)
        first = bucket_quantile(0.99, bucket_sum([deltas[i] for i in counted[:fifth]]))
        last = bucket_quantile(0.99, bucket_sum([deltas[i] for i in counted[-fifth:]]))
        drift.update(first_p99_ms=_ms(first), last_p99_ms=_ms(last), intervals_per_fifth=fifth)
        if first and last is not None:
            drift.update(drift=round(last / first, 3), passed=last / first <= limit)
    return drift


class Sampler(threading.Thread):
    """Scrapes the metrics URL every interval until stopped; folds in the load's progress snapshots."""

    def __init__(self, config: LoadConfig) -> None:
        super().__init__(name="lstm-loadtest-soak-sampler", daemon=True)
        self.config = config
        self.url = config.metrics_url
        self.stopping = threading.Event()
        self.started_at = time.monotonic()
        self.rows: list[dict[str, Any]] = []  # t_s still monotonic here; made relative to the origin at the end
        self.deltas: list[Buckets] = []
        self._previous: Buckets = ()
        self._lock = threading.Lock()
        self._latencies: list[np.ndarray] = []  # the load's answers since the last scrape, seconds
        self.origin: float | None = None  # the run's origin, from the snapshots (time.monotonic() scale)

    def watch(self, snapshot: Snapshot) -> None:
        """Called with every progress snapshot of the load (any process)."""
        # A snapshot says its time since the origin; it reaches here a little later, so the earliest
        # estimate of the origin is the best.
        estimate = time.monotonic() - snapshot.time
        with self._lock:
            self.origin = estimate if self.origin is None else min(self.origin, estimate)
            if snapshot.latencies.size:
                self._latencies.append(snapshot.latencies)

    def run(self) -> None:
        next_at = time.monotonic()
        while True:
            self._sample()
            next_at += self.config.soak_interval_s
            if self.stopping.wait(max(0.0, next_at - time.monotonic())):
                break
        self._sample()  # the run's end

    def _sample(self) -> None:
        at = time.monotonic()
        with self._lock:
            latencies = np.concatenate(self._latencies) if self._latencies else np.empty(0)
            self._latencies = []
        client_p99 = _ms(float(np.percentile(latencies, 99))) if latencies.size else None
        row: dict[str, Any] = {"t_s": at, "rss_bytes": None, "redis_used_memory_bytes": None, "open_streams": None,
                               "in_flight_calls": None, "server_p50_ms": None, "server_p99_ms": None,
                               "client_p99_ms": client_p99, "error": None}
        try:
            with urllib.request.urlopen(self.url, timeout=self.config.soak_scrape_timeout_s) as answer:
                scrape = parse_metrics(answer.read().decode())
        except Exception as exc:  # a gap in the samples; the soak goes on
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            self.rows.append(row)
            self.deltas.append(())
            return
        delta = bucket_delta(self._previous, scrape.latency) if self._previous else ()
        self._previous = scrape.latency or self._previous
        row.update(rss_bytes=scrape.rss_bytes, redis_used_memory_bytes=scrape.redis_used_memory_bytes,
                   open_streams=scrape.open_streams, in_flight_calls=scrape.in_flight_calls,
                   server_p50_ms=_ms(bucket_quantile(0.5, delta)), server_p99_ms=_ms(bucket_quantile(0.99, delta)))
        self.rows.append(row)
        self.deltas.append(delta)

    def finish(self) -> None:
        self.stopping.set()
        self.join(self.config.soak_scrape_timeout_s + 5)

    def samples(self) -> list[dict[str, Any]]:
        """The rows with t_s in seconds since the run's origin."""
        origin = self.origin if self.origin is not None else self.started_at
        return [{**row, "t_s": round(row["t_s"] - origin, 3)} for row in self.rows]


class Churn(threading.Thread):
    """Short-lived streams beside the load, on their own channel and event loop: every `soak_churn_every_s`,
    `soak_churn` new streams each send `soak_churn_chunks` chunks and are reset."""

    def __init__(self, config: LoadConfig, model: ModelInfo) -> None:
        super().__init__(name="lstm-loadtest-soak-churn", daemon=True)
        self.config = config
        self.model = model
        self.stopping = threading.Event()
        self.started = 0
        self.completed = 0
        self.failed = 0
        self.chunks = 0
        self.errors: Counter[str] = Counter()
        self.retry = RetryPolicy(deadline_s=None, attempt_timeout_s=config.timeout_s, max_backoff_s=1.0,
                                 max_attempts=config.max_retries + 1)

    def run(self) -> None:
        asyncio.run(self._churn())

    async def _churn(self) -> None:
        channel = aio_channel(self.config)
        stub = pb_grpc.StreamInferenceStub(channel)
        metadata = call_metadata(self.config.api_key)
        running: set[asyncio.Task[None]] = set()
        try:
            while not self.stopping.is_set():
                for _ in range(self.config.soak_churn):
                    task = asyncio.create_task(self._one(stub, metadata, self.started))
                    self.started += 1
                    running.add(task)
                    task.add_done_callback(running.discard)
                deadline = time.monotonic() + self.config.soak_churn_every_s
                while not self.stopping.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            if running:
                # Each stream has a few chunks left at most; never hold the report hostage to a stalled one.
                _, late = await asyncio.wait(running, timeout=self.config.timeout_s * 2 + 5)
                for task in late:
                    task.cancel()
        finally:
            await channel.close()

    async def _one(self, stub: pb_grpc.StreamInferenceStub, metadata: tuple[tuple[str, str], ...], index: int) -> None:
        stream_id = self.config.churn_stream_id(index)
        kind = StreamTransport if self.config.api == "stream" else UnaryTransport
        transport = kind(stub, metadata)
        sensor = Sensor(self.config.seed + 1_000_000 + index, self.model.input_features)
        offset = 0

        def failed(error: BaseException, will_retry: bool) -> None:
            if isinstance(error, ChunkFailed):
                self.errors[error.code_name] += 1

        try:
            for n in range(self.config.soak_churn_chunks):
                chunk = sensor.next(self.config.chunk_timesteps)
                request = pb.PredictRequest(stream_id=stream_id, values=chunk.reshape(-1).tolist(),
                                            timesteps=chunk.shape[0], reset=n == 0, start_offset=offset,
                                            model=self.config.model_name)
                await retry_async(lambda timeout, request=request: transport.send(request, timeout), self.retry,
                                  on_error=failed)
                offset += chunk.shape[0]
                self.chunks += 1
            self.completed += 1
        except ChunkFailed:
            self.failed += 1
        finally:
            await transport.close()
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.ResetStream(pb.ResetStreamRequest(stream_id=stream_id, model=self.config.model_name),
                                       timeout=5, metadata=metadata)

    def finish(self) -> None:
        self.stopping.set()
        self.join(self.config.timeout_s * 2 + 15)

    def summary(self) -> dict[str, Any]:
        return {"every_s": self.config.soak_churn_every_s, "per_round": self.config.soak_churn,
                "chunks_per_stream": self.config.soak_churn_chunks, "streams_started": self.started,
                "streams_completed": self.completed, "streams_failed": self.failed, "chunks": self.chunks,
                "errors": dict(self.errors.most_common())}


class SoakRun:
    """The sampler (and the churn, when asked) around one load run: a context manager that starts both on
    entry and stops them on exit, whatever ended the load; `finish()` stops them at the load's end and judges."""

    def __init__(self, config: LoadConfig, model: ModelInfo, on_snapshot: Callable[[Snapshot], None] | None) -> None:
        self.config = config
        self.sampler = Sampler(config)
        self.churn = Churn(config, model) if config.soak_churn else None
        self._forward = on_snapshot

    def on_snapshot(self, snapshot: Snapshot) -> None:
        """The snapshot callback the load must be given: the sampler sees each one, then whoever else asked."""
        self.sampler.watch(snapshot)
        if self._forward is not None:
            self._forward(snapshot)

    def __enter__(self) -> SoakRun:
        self.sampler.start()
        if self.churn is not None:
            self.churn.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.churn is not None and self.churn.is_alive():
            self.churn.finish()
        if self.sampler.is_alive():
            self.sampler.finish()

    def finish(self) -> dict[str, Any]:
        """Stop sampling and churning; the report's `soak` section."""
        self.stop()
        config = self.config
        samples = self.sampler.samples()
        judged = verdict(samples, self.sampler.deltas, config.warmup_s, config.max_memory_slope_mib_h,
                         config.max_p99_drift)
        return {
            "metrics_url": config.metrics_url,
            "interval_s": config.soak_interval_s,
            "warmup_s": config.warmup_s,
            "scrapes": len(samples),
            "gaps": sum(1 for sample in samples if sample["error"] is not None),
            **judged,
            "churn": self.churn.summary() if self.churn is not None else None,
            "samples": samples,
        }


def print_soak(soak: dict[str, Any], console: Console) -> None:
    """The soak's verdict and its figures, after the load's table."""
    memory, drift = soak["memory"], soak["p99_drift"]
    where = f"{soak['scrapes']} scrapes of {soak['metrics_url']} every {soak['interval_s']:g} s"
    if soak["gaps"]:
        where += f", {soak['gaps']} failed"
    slope = ("-" if memory["slope_mib_per_h"] is None else
             f"{memory['slope_mib_per_h']:,.1f} MiB/h ({memory['first_mib']:,.1f} -> {memory['last_mib']:,.1f} MiB)")
    ratio = ("-" if drift["drift"] is None else
             f"x{drift['drift']:.2f} ({drift['first_p99_ms']:.3g} -> {drift['last_p99_ms']:.3g} ms)")
    console.print(f"soak: {where}; server memory slope {slope}, limit {memory['max_slope_mib_per_h']:g} MiB/h; "
                  f"p99 drift {ratio}, limit x{drift['max_drift']:g}")
    if memory.get("redis_slope_mib_per_h") is not None:
        console.print(f"soak: Redis memory slope {memory['redis_slope_mib_per_h']:,.1f} MiB/h (not judged)")
    churn = soak["churn"]
    if churn is not None:
        style = "yellow" if churn["streams_failed"] else None
        console.print(f"soak: churn: {churn['streams_started']:,} short-lived streams started, "
                      f"{churn['streams_completed']:,} completed, {churn['streams_failed']:,} failed, "
                      f"{churn['chunks']:,} chunks", style=style)
    if soak["passed"] is None:
        console.print(f"[yellow]soak: no verdict: too few samples after the warm-up (fewer than "
                      f"{MIN_VERDICT_SAMPLES} with the figures); run longer or sample more often[/yellow]")
    elif soak["passed"]:
        console.print("[green]soak: OK[/green]")
    else:
        for failure in soak["failures"]:
            console.print(f"[red bold]soak: FAILED[/red bold]: {failure}")
