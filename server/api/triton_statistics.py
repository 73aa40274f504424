"""What Triton's ModelStatistics reports: cheap counters of this protocol's requests in this server process.

The stages are Triton's, mapped onto this server's data path (server/types.py, StageTimes), each
counted once per successful request so that perf_analyzer's breakdown adds up to the request time:

- success: from the request's arrival at the servicer to its answer being ready;
- queue: waiting in the batcher for a batch (a stream's next chunk waits for its previous one);
- compute_input: loading the batch's slots from Redis and applying the stream rules;
- compute_infer: the model call, shared by every chunk of the batch (Triton counts it the same way);
- compute_output: saving the slots to Redis (with --redis-wait-replicas, until replicas confirm).

A request answered without the model (a replayed retry) counts its whole batch as compute_input.
`execution_count` counts model calls: a call shared by n requests counts 1/n for each, so requests
of the native API that shared a call are not counted, and under Triton-only load it is the number of
model calls.

With API keys (invariant 13, docs/invariants.md) each tenant has its own counters, and ModelStatistics
answers a caller with its tenant's alone: another tenant's traffic is not the caller's to see.
Without keys there is one set of counters, under the tenant "".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lstm_stream.triton import grpc_service_pb2 as pb
from server.types import StageTimes


@dataclass(slots=True)
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def message(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass(slots=True)
class TritonStatistics:
    """Requests of this protocol answered by this server process since it started (each replica keeps its own)."""

    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)
    executions: float = 0.0  # model calls, each shared among the requests it answered
    last_inference_ms: int = 0

    def record_failure(self, started_ns: int) -> None:
        self.fail.add(time.monotonic_ns() - started_ns)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_success(self, started_ns: int, times: StageTimes) -> None:
        """A request answered OK; every such answer came out of a batch, so `times` has its stages."""
        self.success.add(time.monotonic_ns() - started_ns)
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.queue.add(times.batch_started - times.queued)
        if times.model_started:
            self.compute_input.add(times.model_started - times.batch_started)
            self.compute_infer.add(times.model_finished - times.model_started)
            self.compute_output.add(times.batch_finished - times.model_finished)
            self.executions += 1 / times.model_batch
        else:
            self.compute_input.add(times.batch_finished - times.batch_started)
            self.compute_infer.add(0)
            self.compute_output.add(0)

    def message(self, name: str, version: str) -> pb.ModelStatistics:
        return pb.ModelStatistics(
            name=name,
            version=version,
            last_inference=self.last_inference_ms,
            inference_count=self.success.count,
            execution_count=round(self.executions),
            inference_stats=pb.InferStatistics(
                success=self.success.message(),
                fail=self.fail.message(),
                queue=self.queue.message(),
                compute_input=self.compute_input.message(),
                compute_infer=self.compute_infer.message(),
                compute_output=self.compute_output.message(),
            ),
        )


class TenantStatistics:
    """One TritonStatistics per tenant, made on a tenant's first request (tenants come from the key file)."""

    def __init__(self) -> None:
        self._by_tenant: dict[str, TritonStatistics] = {}

    def of(self, tenant: str) -> TritonStatistics:
        statistics = self._by_tenant.get(tenant)
        if statistics is None:
            statistics = self._by_tenant[tenant] = TritonStatistics()
        return statistics
