"""What Triton's ModelStatistics reports: cheap counters of this protocol's requests in this server process."""

from __future__ import annotations

import time
from dataclasses import dataclass

from lstm_stream.triton import grpc_service_pb2 as pb


@dataclass(slots=True)
class TritonStatistics:
    """Requests of this protocol answered by this server process since it started (each replica keeps its own)."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    last_inference_ms: int = 0

    def record(self, ok: bool, started_ns: int) -> None:
        elapsed = time.monotonic_ns() - started_ns
        if ok:
            self.success_count += 1
            self.success_ns += elapsed
        else:
            self.fail_count += 1
            self.fail_ns += elapsed
        self.last_inference_ms = time.time_ns() // 1_000_000

    def message(self, name: str, version: str) -> pb.ModelStatistics:
        duration = pb.StatisticDuration
        return pb.ModelStatistics(
            name=name,
            version=version,
            last_inference=self.last_inference_ms,
            inference_count=self.success_count,
            execution_count=self.success_count,
            inference_stats=pb.InferStatistics(
                success=duration(count=self.success_count, ns=self.success_ns),
                fail=duration(count=self.fail_count, ns=self.fail_ns),
            ),
        )
