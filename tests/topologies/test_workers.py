"""--workers N: server processes sharing one port, sharing state only through Redis."""

from __future__ import annotations

import datetime
import json
import os
import signal
import uuid

import grpc
import numpy as np
import pytest

from devkit.native_calls import outputs, predict
from devkit.processes import wait_until
from devkit.references import TOLERANCE, keras_whole_sequence
from lstm_stream.v1 import stream_pb2_grpc
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.slow


@pytest.mark.timeout(180)
def test_two_workers_share_the_port_and_every_stream(start_server) -> None:
    server = start_server("--workers", "2")
    wait_until(lambda: server.log().count('"msg": "serving"') == 2, 90, "both workers serving")
    entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert sorted(e["worker"] for e in entries if e["msg"] == "serving") == ["0/2", "1/2"]
    (pids,) = [e["pids"] for e in entries if e["msg"] == "started workers"]
    rng = np.random.default_rng(1)
    streams = {f"w-{uuid.uuid4().hex[:6]}-{n}": rng.normal(size=(30, 1)).astype(np.float32) for n in range(6)}
    got: dict[str, list[np.ndarray]] = {s: [] for s in streams}
    # A new connection for every chunk: the kernel spreads connections over the workers.
    for start in range(0, 30, 10):
        for stream, x in streams.items():
            with grpc.insecure_channel(server.address) as channel:
                stub = stream_pb2_grpc.StreamInferenceStub(channel)
                got[stream].append(outputs(predict(stub, stream, x[start : start + 10], start_offset=start)))
    for stream, x in streams.items():
        assert np.max(np.abs(np.concatenate(got[stream]) - keras_whole_sequence(DEFAULT_MODEL, x))) <= TOLERANCE
    assert server.stop() == 0
    for pid in pids:  # SIGTERM to the supervisor stopped every worker
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # Each worker drained and said so, and the supervisor's last word is its own.
    entries = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    assert [e["msg"] for e in entries].count("stopped") == 3
    assert entries[-1]["msg"] == "stopped" and entries[-1]["exit_code"] == 0
    assert not [e for e in entries if e["level"] in ("error", "critical")]


def _entries(server) -> list[dict]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its dead parent's reaper) is not serving either.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.timeout(180)
def test_a_crash_looping_worker_backs_off_and_no_worker_outlives_the_supervisor(start_server) -> None:
    server = start_server("--workers", "2", "--drain-delay-s", "0.2", "--shutdown-grace-s", "5")
    (started,) = [e for e in _entries(server) if e["msg"] == "started workers"]
    pid = started["pids"][0]
    # Kill worker 0 each time it is started: the supervisor waits longer every time (0.5, 1, 2 s).
    for crash in range(3):
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda n=crash: len([e for e in _entries(server) if e["msg"] == "worker started again"]) > n,
                   30, f"worker 0 started again after crash {crash + 1}")
        pid = [e for e in _entries(server) if e["msg"] == "worker started again"][-1]["pid"]
    entries = _entries(server)
    exits = [e for e in entries if e["msg"].startswith("worker exited")]
    restarts = [e for e in entries if e["msg"] == "worker started again"]
    assert [e["delay_s"] for e in exits] == [0.5, 1.0, 2.0]
    assert [e["crashes"] for e in exits] == [1, 2, 3]

    def at(entry: dict) -> float:
        return datetime.datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).timestamp()

    for exited, restarted in zip(exits, restarts, strict=True):
        assert at(restarted) - at(exited) >= exited["delay_s"] - 0.01
    # SIGKILL the supervisor: its workers must not go on serving unsupervised.
    workers = [started["pids"][1], pid]
    server.kill()
    wait_until(lambda: not any(_alive(p) for p in workers), 30, "the workers to exit after their supervisor died")
