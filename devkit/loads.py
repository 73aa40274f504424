"""A verified load in the background, for the tests that disrupt Redis in the middle of one.

The Sentinel failover, the cluster slot migrations and the cluster master failover all run the same way:
`lstm-loadtest --verify`, retrying by offset, in a thread; wait until one stream is well under way; do
the disruption; wait for the load to finish; check from its report that nothing acknowledged was lost
(invariants 8 and 11, docs/invariants.md).
"""

from __future__ import annotations

import threading

from devkit.processes import wait_until
from loadtest import EXIT_OK, LoadConfig, run_load
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc
from server.config import DEFAULT_MODEL


class VerifiedLoad:
    """`lstm-loadtest --verify` against `address`, retrying by offset, run in a daemon thread."""

    def __init__(self, address: str, prefix: str, *, streams: int, total_chunks: int, timeout_s: float,
                 max_retries: int, chunk_timesteps: int = 3) -> None:
        self.config = LoadConfig(target=address, streams=streams, chunk_timesteps=chunk_timesteps,
                                 total_chunks=total_chunks, duration_s=None, warmup_s=0, timeout_s=timeout_s,
                                 max_retries=max_retries, stream_prefix=prefix, verify=True,
                                 model_path=str(DEFAULT_MODEL))
        self._reports: list[dict] = []
        self._thread = threading.Thread(target=lambda: self._reports.append(run_load(self.config)), daemon=True)

    def stream_id(self, n: int) -> str:
        return f"{self.config.stream_prefix}-{n}"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self, stub: stream_pb2_grpc.StreamInferenceStub, stream: int, offset: int, timeout_s: float) -> None:
        """Start the load and return once stream number `stream` has reached `offset`, the load still
        running: the disruption that follows lands in its middle."""
        self._thread.start()
        wait_until(lambda: not self.running or stub.GetStream(
            pb.GetStreamRequest(stream_id=self.stream_id(stream)), timeout=5).offset >= offset, timeout_s,
            "the load to get going")
        assert self.running, "the load finished before the disruption"

    def finish(self, timeout_s: float) -> dict:
        """Wait for the load to end; its report."""
        self._thread.join(timeout_s)
        assert not self.running, "the load did not finish after the disruption"
        return self._reports[0]


def summary(report: dict) -> str:
    """One line for the test's output: what the disruption cost the clients."""
    return (f"exit {report['exit_code']}, {report['totals']['chunks']} chunks, retries {report['retries']}, "
            f"errors {report['errors']}, max latency {report['latency_ms']['max']:.0f} ms, "
            f"{report['chunks_per_s']:.0f} chunks/s, state lost {report['verify']['state_lost']}, "
            f"mismatches {report['verify']['mismatches']}, broken {report['broken_streams']}")


def assert_nothing_lost(load: VerifiedLoad, report: dict) -> None:
    """Every stream verified against Keras, none lost acknowledged state or broke, every chunk answered."""
    assert report["exit_code"] == EXIT_OK, report["verify"]
    assert report["verify"]["passed"]
    assert not report["verify"]["state_lost"] and not report["verify"]["mismatches"]
    assert not report["broken_streams"]
    # All answered: the load went on through the disruption (the server waits for Redis within each
    # chunk's deadline, so a client may see latency and retries, never a lost chunk).
    assert report["totals"]["chunks"] == load.config.total_chunks
