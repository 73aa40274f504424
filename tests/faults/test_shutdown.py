"""Drain on SIGTERM under load (docs/operations.md, "Shutdown and draining").

A server under streaming and unary load from lstm-loadtest (retrying by offset, verifying against
Keras) gets SIGTERM: health reads NOT_SERVING while the port is still open, no client sees INTERNAL,
the process exits 0 within the grace with a final "stopped" line and only JSON lines on stderr (no
ERROR, no "Future exception was never retrieved"); a new server on the same port and Redis then
serves the rest, and every stream verifies (invariants 1 and 4, docs/invariants.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devkit import ROOT
from devkit.processes import NO_WARMUP, RedisServer, ServerProcess, free_port, wait_until
from lstm_stream.v1 import stream_pb2 as pb
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.slow

GRACE_S = 10.0
UNREACHABLE = "UNREACHABLE"


def _loadtest(target: str, api: str, prefix: str, json_path) -> subprocess.Popen[str]:
    # Open loop, bounded by a chunk count (not a duration): the tool keeps retrying through the restart.
    command = [sys.executable, "-m", "loadtest", "--no-progress", "--target", target, "--api", api,
               "--streams", "4", "--chunk", "5", "--rate", "8", "--chunks", "240", "--warmup", "0",
               "--max-retries", "200", "--timeout", "5", "--stream-prefix", prefix, "--verify",
               "--json", str(json_path)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


class HealthWatch(threading.Thread):
    """Polls grpc.health.v1 Check until the port closes, recording what it read."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.seen: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service="lstm_stream.v1.StreamInference"),
                                       timeout=5, wait_for_ready=False)
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as error:
                    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        continue  # a slow answer under load says nothing about the port
                    status = UNREACHABLE
                if not self.seen or self.seen[-1] != status:
                    self.seen.append(status)
                if status == UNREACHABLE and "NOT_SERVING" in self.seen:
                    break
                self.done.wait(0.02)


@pytest.mark.timeout(300)
def test_sigterm_under_load_drains_cleanly_and_a_new_server_continues(tmp_path) -> None:
    redis = RedisServer()
    port = free_port()
    flags = ("--drain-delay-s", "1", "--shutdown-grace-s", str(GRACE_S))
    first = ServerProcess(redis.url, DEFAULT_MODEL, *flags, port=port)
    second = None
    loads = {}
    try:
        for api in ("stream", "unary"):
            loads[api] = _loadtest(first.address, api, f"drain-{api}", tmp_path / f"{api}.json")
        # Let the load get going on both protocols' streams, then stop the server in the middle of it.
        wait_until(lambda: min(first.stub.GetStream(pb.GetStreamRequest(stream_id=f"drain-{api}-0"), timeout=5).offset
                               for api in loads) >= 50, 60, "the load to get going")
        watch = HealthWatch(first.address)
        watch.start()
        # Its first answer before the signal: under load, a new channel's first Check can outlast the drain delay.
        wait_until(lambda: watch.seen, 20, "the health watch's first answer")
        signalled = time.monotonic()
        first.process.send_signal(signal.SIGTERM)
        code = first.process.wait(GRACE_S + 10)
        took = time.monotonic() - signalled
        watch.join(30)
        assert code == 0, first.log()[-3000:]
        assert took <= GRACE_S + 2, f"exit took {took:.1f} s, grace {GRACE_S} s"
        # Health said NOT_SERVING (and never SERVING again) before the port closed.
        assert watch.seen[:3] == ["SERVING", "NOT_SERVING", UNREACHABLE], watch.seen
        log = first.log()
        assert "Future exception was never retrieved" not in log
        entries = [json.loads(line) for line in log.splitlines() if line.strip()]  # every line is JSON
        assert not [e for e in entries if e["level"] in ("error", "critical")], log[-3000:]
        messages = [e["msg"] for e in entries]
        assert messages[-1] == "stopped" and entries[-1]["exit_code"] == 0
        assert any(m.startswith("draining") for m in messages) and any(m.startswith("refusing") for m in messages)

        # A new server on the same port and Redis: the tools, still retrying by offset, carry on there.
        # (No warm-up: the first server drained with its own under way; this one only serves the rest.)
        second = ServerProcess(redis.url, DEFAULT_MODEL, *NO_WARMUP, *flags, port=port)
        for api, process in loads.items():
            out, err = process.communicate(timeout=180)
            report = json.loads((tmp_path / f"{api}.json").read_text())
            assert process.returncode == 0, f"{api}: {out[-2000:]}\n{err[-2000:]}"
            assert report["verify"]["passed"] and not report["broken_streams"], report["verify"]
            # Clients saw retryable codes only: never INTERNAL ("Internal error from Core"). CANCELLED is
            # gRPC core's answer to a call arriving in the instant the port closes; clients retry it.
            retried = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"}
            assert set(report["totals"]["errors"]) <= retried, report["totals"]
            assert report["totals"]["errors"], f"{api}: the load never met the shutdown"
    finally:
        for process in loads.values():
            if process.poll() is None:
                process.kill()
        first.stop()
        if second is not None:
            second.stop()
        redis.stop()

