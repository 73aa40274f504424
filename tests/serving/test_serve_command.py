"""The README's serve command path: lstm-serve finds no Redis, starts a private one, and state survives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import grpc
import numpy as np
import pytest
import redis

from devkit import ROOT
from devkit.native_calls import predict
from devkit.processes import free_port, no_retry, wait_until
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc


def _start(redis_port: int, grpc_port: int, data_dir) -> subprocess.Popen:
    # No load balancer to wait for: stop at SIGTERM without the 5 s drain delay (twice a test).
    command = [sys.executable, "-m", "server", "--port", str(grpc_port), "--redis-url",
               f"redis://127.0.0.1:{redis_port}/0", "--redis-data-dir", str(data_dir), "--log-format", "json",
               "--drain-delay-s", "0"]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _ready(stub, process: subprocess.Popen) -> bool:
    if process.poll() is not None:
        raise RuntimeError(f"server exited with {process.returncode}: {process.stdout.read().decode()}")
    try:
        stub.GetModel(pb.GetModelRequest(),
                      timeout=1)
        return True
    except grpc.RpcError:
        return False


@pytest.mark.timeout(180)
def test_private_redis_is_started_and_keeps_state_across_restarts(tmp_path) -> None:
    redis_port, grpc_port = free_port(), free_port()
    stream = f"private-{uuid.uuid4().hex[:8]}"
    x = np.ones((5, 1), np.float32)
    for run, expected_offset in ((1, 5), (2, 10)):
        process = _start(redis_port, grpc_port, tmp_path / "redis")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = stream_pb2_grpc.StreamInferenceStub(channel)
                wait_until(lambda s=stub, p=process: _ready(s, p), 90, f"server run {run}", interval_s=0.2)
                assert predict(stub, stream, x).offset == expected_offset
        finally:
            process.send_signal(signal.SIGTERM)
            log = process.communicate(timeout=30)[0].decode()
        assert "private redis-server was started" in log
        assert process.returncode == 0, log
        # The private Redis goes away with the server, its append-only file stays.
        with pytest.raises(redis.exceptions.ConnectionError):
            redis.Redis(port=redis_port, socket_connect_timeout=1, retry=no_retry()).ping()
    assert any((tmp_path / "redis").rglob("*.aof*"))


def test_no_redis_and_no_autostart_exits_with_advice(tmp_path) -> None:
    command = [sys.executable, "-m", "server", "--redis-url", f"redis://127.0.0.1:{free_port()}/0",
               "--redis-autostart", "false", "--port", "0"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "install Redis" in result.stderr


@pytest.mark.timeout(120)
def test_a_taken_port_is_a_clear_error(redis_server) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags in (["--port", str(port), "--metrics-port", "0"],
                      ["--port", str(free_port()), "--metrics-port", str(port)]):
            command = [sys.executable, "-m", "server", "--redis-url", redis_server.url, "--redis-autostart", "false",
                       "--xla", "false", *flags]
            result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=90)
            assert result.returncode == 2, result.stderr[-2000:]
            assert "cannot" in result.stderr and str(port) in result.stderr and "Traceback" not in result.stderr
