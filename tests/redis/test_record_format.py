"""Rolling upgrades (issue 29; server/state/formats.py): replicas write the newest record format every
replica serving beside them reads. A new deployment takes the newest format by itself; one whose Redis
already holds slots of the previous release (0.1.0, which reads formats 1 and 2) writes format 2 (the
last answer only) until `lstm-serve admin record-format 3`; a record in a format newer than this release
reads is answered UNAVAILABLE (another replica can read it), never DATA_LOSS, and left as it is.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import grpc
import numpy as np
import pytest
import redis

from devkit import ROOT
from devkit.native_calls import predict, status_of
from devkit.processes import RedisServer, wait_until
from lstm_stream.v1 import stream_pb2 as pb
from server.state.record import NEWEST_FORMAT

pytestmark = pytest.mark.timeout(180)

X = np.random.default_rng(5).normal(size=(12, 1)).astype(np.float32)


def record_format(client: redis.Redis, stream: str) -> int:
    return client.get(f"lstm:{{{stream}}}")[10]


def chunks(stub, stream: str, count: int) -> None:
    for n in range(count):
        predict(stub, stream, X[3 * n:3 * n + 3], start_offset=3 * n, reset=n == 0)


def admin(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server", "admin", "record-format", *args, "--redis-url", redis_url],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_a_new_deployment_writes_the_newest_format(start_server) -> None:
    fresh = RedisServer(appendonly=False)
    try:
        server = start_server(redis_url=fresh.url)
        stream = f"new-{uuid.uuid4().hex[:6]}"
        chunks(server.stub, stream, 3)
        client = redis.Redis.from_url(fresh.url)
        assert client.get("lstm:record-format") == str(NEWEST_FORMAT).encode()
        assert record_format(client, stream) == 3  # earlier answers, no input history (--history-timesteps 0)
        assert predict(server.stub, stream, X[0:3], start_offset=0, reset=True).replayed  # two chunks back
        assert f"record format: {NEWEST_FORMAT}" in admin(fresh.url).stdout
    finally:
        fresh.stop()


def test_a_deployment_upgraded_from_0_1_0_writes_format_2_until_the_operator_allows_3(start_server) -> None:
    upgraded = RedisServer(appendonly=False)
    try:
        client = redis.Redis.from_url(upgraded.url)
        client.set("lstm:{written-by-0.1.0}", b"any record")  # what the previous release left, no format key
        server = start_server(redis_url=upgraded.url)
        assert "writing format 2" in server.log()
        assert f"lstm-serve admin record-format {NEWEST_FORMAT}" in server.log()
        stream = f"upgraded-{uuid.uuid4().hex[:6]}"
        chunks(server.stub, stream, 3)
        assert client.get("lstm:record-format") is None and record_format(client, stream) == 2
        # Format 2 keeps the last answer only: a chunk two back is refused, never applied again.
        code, message, _ = status_of(predict, server.stub, stream, X[3:6], start_offset=3)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "no longer kept" in message, message

        done = admin(upgraded.url, "3")
        assert done.returncode == 0 and "record format 3 allowed" in done.stdout, done.stderr
        assert "3" in admin(upgraded.url).stdout

        def writes_format_3() -> bool:
            probe = f"probe-{uuid.uuid4().hex[:6]}"
            chunks(server.stub, probe, 2)
            return record_format(client, probe) == 3

        wait_until(writes_format_3, 30, "the replica to pick up format 3", interval_s=1)
        assert "writing record format 3" in server.log()
        # The stream written in format 2 goes on, and from now on keeps its answers.
        predict(server.stub, stream, X[9:12], start_offset=9)
        assert record_format(client, stream) == 3
        assert predict(server.stub, stream, X[6:9], start_offset=6).replayed
        # Lowered again (before a rollback to 0.1.0): format 2 from the next refresh on.
        assert admin(upgraded.url, "2").returncode == 0
        wait_until(lambda: "writing record format 2" in server.log(), 30, "the replica to pick up format 2")
        again = f"lowered-{uuid.uuid4().hex[:6]}"
        chunks(server.stub, again, 3)
        assert record_format(client, again) == 2
    finally:
        upgraded.stop()


def test_a_record_of_a_newer_release_is_unavailable_here_not_lost(default_server, redis_server) -> None:
    client = redis.Redis.from_url(redis_server.url)
    stream = f"newer-{uuid.uuid4().hex[:6]}"
    newer = b"v" * 8 + b"LS" + bytes([5]) + bytes(200)  # a format-5 record, as a later release might write
    client.set(f"lstm:{{{stream}}}", newer)
    for reset in (False, True):
        code, message, _ = status_of(predict, default_server.stub, stream, X[0:3], reset=reset)
        assert code == grpc.StatusCode.UNAVAILABLE, message
        assert "newer release" in message and "record format 5" in message and "nothing was applied" in message
    code, message, _ = status_of(default_server.stub.GetStream, pb.GetStreamRequest(stream_id=stream), timeout=10)
    assert code == grpc.StatusCode.UNAVAILABLE and "newer release" in message
    assert client.get(f"lstm:{{{stream}}}") == newer  # untouched, for the replica that reads it
    # ResetStream forgets any slot, whatever wrote it.
    assert default_server.stub.ResetStream(pb.ResetStreamRequest(stream_id=stream), timeout=10).existed
    assert client.get(f"lstm:{{{stream}}}") is None


def test_admin_refuses_a_format_this_release_does_not_write(redis_server) -> None:
    done = admin(redis_server.url, "9")
    assert done.returncode == 2 and "not one this release writes" in done.stderr


def test_admin_says_what_is_wrong_without_a_traceback_or_a_password(redis_server) -> None:
    usage = subprocess.run([sys.executable, "-m", "server", "admin"], capture_output=True, text=True, timeout=60,
                           cwd=ROOT)
    assert usage.returncode == 2 and "usage: lstm-serve admin record-format" in usage.stderr
    nobody = admin("redis://127.0.0.1:1/0")
    assert nobody.returncode == 2 and "cannot reach Redis" in nobody.stderr and "Traceback" not in nobody.stderr
    malformed = admin("redis://:Secret#Part@127.0.0.1:6379/0")
    assert malformed.returncode == 2 and "percent-encode" in malformed.stderr
    assert "Secret" not in malformed.stderr + malformed.stdout and "Traceback" not in malformed.stderr
    client = redis.Redis.from_url(redis_server.url)
    client.set("garbled:record-format", "three")
    garbled = subprocess.run([sys.executable, "-m", "server", "admin", "record-format", "--redis-url", redis_server.url,
                              "--key-prefix", "garbled"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert garbled.returncode == 2 and "not a format number" in garbled.stderr
