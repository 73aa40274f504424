"""What a run keeps: one row per finished chunk in flat arrays, and error events. (What --verify needs
goes to the live verifier as the load runs: loadtest/live_verify.py; `StreamLog` is its record of the
streams it checks whole.)

Times are seconds since the run's origin (a `time.monotonic()` value every process shares), so the
recordings of several processes merge by concatenation.
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Segment:
    """One sequence of a stream, from a reset to its end or to the error that broke it."""

    inputs: list[np.ndarray] = field(default_factory=list)  # each [timesteps, features]
    outputs: list[np.ndarray] = field(default_factory=list)  # each [rows, output_size]
    server_offsets: list[int] = field(default_factory=list)  # the offset each response reported


@dataclass
class StreamLog:
    stream_id: str
    seed: int
    segments: list[Segment] = field(default_factory=lambda: [Segment()])


@dataclass
class Snapshot:
    """Progress of one process since its previous snapshot (cheap to pickle between processes)."""

    source: int
    time: float  # seconds since origin
    chunks: int  # totals since the start
    timesteps: int
    errors: int
    retries: int
    late: int
    active_streams: int
    latencies: np.ndarray  # seconds, of the chunks finished since the previous snapshot


class Recorder:
    """Every chunk one process finished, appended in O(1) without per-chunk objects."""

    def __init__(self) -> None:
        self.sent = array("d")  # first attempt's send time
        self.latency = array("d")  # from the first attempt's send to the answer, retries included
        self.timesteps = array("I")
        self.lag = array("d")  # open loop: how much later than scheduled the chunk was sent
        self.error_times = array("d")
        self.error_codes: list[str] = []
        self.retries = 0
        self.replays = 0
        self.failed_chunks = 0
        self.late = 0
        self.gateway_messages = 0  # --gateways: PredictBatch messages sent (retries' resends included)
        self.version_chunks: Counter[int] = Counter()  # answered chunks per model version that answered
        self.migrations = 0  # chunks that moved their stream off a retired version (a new sequence)
        self.broken: list[dict[str, Any]] = []
        self.active_streams = 0
        self._snapshot_at = 0
        self._timesteps_total = 0

    def chunk(self, sent: float, latency: float, timesteps: int, lag: float) -> None:
        self.sent.append(sent)
        self.latency.append(latency)
        self.timesteps.append(timesteps)
        self.lag.append(lag)
        self._timesteps_total += timesteps

    def error(self, when: float, code: str) -> None:
        self.error_times.append(when)
        self.error_codes.append(code)

    def snapshot(self, source: int, now: float) -> Snapshot:
        end = len(self.latency)
        recent = np.frombuffer(self.latency, dtype=np.float64)[self._snapshot_at : end].copy()
        self._snapshot_at = end
        return Snapshot(source, now, end, self._timesteps_total, len(self.error_codes), self.retries, self.late,
                        self.active_streams, recent)

    def export(self) -> dict[str, Any]:
        """Everything, as plain numpy arrays and lists (picklable, mergeable)."""
        return {
            "sent": np.frombuffer(self.sent, dtype=np.float64).copy(),
            "latency": np.frombuffer(self.latency, dtype=np.float64).copy(),
            "timesteps": np.frombuffer(self.timesteps, dtype=np.uint32).astype(np.int64),
            "lag": np.frombuffer(self.lag, dtype=np.float64).copy(),
            "error_times": np.frombuffer(self.error_times, dtype=np.float64).copy(),
            "error_codes": list(self.error_codes),
            "retries": self.retries,
            "replays": self.replays,
            "failed_chunks": self.failed_chunks,
            "late": self.late,
            "gateway_messages": self.gateway_messages,
            "broken": list(self.broken),
            "version_chunks": dict(self.version_chunks),
            "migrations": self.migrations,
        }


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One recording from the exports of several processes."""
    if len(parts) == 1:
        return parts[0]
    merged: dict[str, Any] = {}
    for key in ("sent", "latency", "timesteps", "lag", "error_times"):
        merged[key] = np.concatenate([part[key] for part in parts])
    for key in ("error_codes", "broken"):
        merged[key] = [item for part in parts for item in part[key]]
    for key in ("retries", "replays", "failed_chunks", "late", "gateway_messages", "migrations"):
        merged[key] = sum(part[key] for part in parts)
    merged["version_chunks"] = dict(sum((Counter(part["version_chunks"]) for part in parts), Counter()))
    return merged


def error_counts(codes: list[str]) -> dict[str, int]:
    return dict(sorted(Counter(codes).items(), key=lambda item: (-item[1], item[0])))
