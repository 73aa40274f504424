"""Faults in the middle of a load (invariants 5, 8 and 9, docs/invariants.md).

Redis killed and restarted from its append-only file, Redis paused (CLIENT PAUSE) and stopped
(SIGSTOP) for less and for more than the callers' deadline, while `lstm-loadtest --verify` drives
streams and retries by offset: every stream verifies against Keras, nothing acknowledged is lost,
nothing is applied twice, and the server neither crashes nor needs a restart. A stall shorter than
the deadline costs latency only: no error at all.

Then a server process SIGKILLed in the middle of batches: a new one continues every stream exactly.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devkit.native_calls import outputs, request
from devkit.processes import RedisServer, ServerProcess, wait_until
from devkit.references import TOLERANCE, keras_whole_sequences
from loadtest import EXIT_OK, LoadConfig, run_load
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.slow

RETRYABLE = {"UNAVAILABLE", "DEADLINE_EXCEEDED"}


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer()  # append-only file, fsync always: what was acknowledged survives a SIGKILL
    yield server
    if server.process and server.process.poll() is None:
        server.process.send_signal(signal.SIGCONT)
    server.stop()


@pytest.fixture(scope="module")
def _servers(redis: RedisServer) -> Iterator[list[ServerProcess]]:
    """This file's servers on `redis`: the last is the one in use; the kill test kills it and appends the
    server it starts again on the same port, which the tests after it use (one start-up fewer)."""
    servers: list[ServerProcess] = []
    yield servers
    for process in servers:
        process.stop()


@pytest.fixture
def server(redis: RedisServer, _servers: list[ServerProcess]) -> ServerProcess:
    if not _servers or _servers[-1].process.poll() is not None:
        _servers.append(ServerProcess(redis.url, DEFAULT_MODEL))
    return _servers[-1]


def kill_and_restart(redis: RedisServer) -> None:
    redis.kill()
    threading.Event().wait(0.5)
    redis.start()  # same port, same folder: it loads the append-only file


def pause(mode: str, milliseconds: int) -> Callable[[RedisServer], None]:
    def fault(redis: RedisServer) -> None:
        redis.client().execute_command("CLIENT", "PAUSE", str(milliseconds), mode)
        threading.Event().wait(milliseconds / 1000 + 0.2)

    return fault


def stop(seconds: float) -> Callable[[RedisServer], None]:
    def fault(redis: RedisServer) -> None:
        assert redis.process is not None
        redis.process.send_signal(signal.SIGSTOP)
        try:
            threading.Event().wait(seconds)
        finally:
            redis.process.send_signal(signal.SIGCONT)

    return fault


# (fault, the loadtest's deadline per attempt, whether the stall is shorter than that deadline). The shorter
# stalls outlast the 2 s socket timeout the server once let decide.
FAULTS = {
    "redis-sigkill-and-aof-restart": (kill_and_restart, 3.0, False),
    "client-pause-write-shorter-than-deadline": (pause("WRITE", 3000), 8.0, True),
    "client-pause-all-longer-than-deadline": (pause("ALL", 2000), 0.5, False),
    "sigstop-shorter-than-deadline": (stop(3.0), 8.0, True),
    "sigstop-longer-than-deadline": (stop(2.0), 0.5, False),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", list(FAULTS))
def test_every_stream_verifies_through_a_redis_fault(server: ServerProcess, redis: RedisServer, name: str) -> None:
    fault, timeout_s, shorter = FAULTS[name]
    prefix = f"fault-{uuid.uuid4().hex[:6]}"
    config = LoadConfig(target=server.address, streams=4, chunk_timesteps=4, duration_s=5, warmup_s=0,
                        timeout_s=timeout_s, max_retries=40, stream_prefix=prefix, verify=True,
                        model_path=str(DEFAULT_MODEL))
    done: list[float] = []

    def saboteur() -> None:
        wait_until(lambda: offset(server, f"{prefix}-0") >= 20, 60, "the load to get going")
        fault(redis)
        done.append(time.monotonic())

    thread = threading.Thread(target=saboteur, daemon=True)
    thread.start()
    report = run_load(config)
    thread.join(60)
    print(f"{name}: chunks {report['totals']['chunks']}, errors {report['errors']}, retries {report['retries']}, "
          f"replays {report['replays']}, latency max {report['latency_ms']['max']:.0f} ms")
    assert done, "the fault did not happen during the load"
    assert report["exit_code"] == EXIT_OK, report["verify"]
    assert report["verify"]["passed"] and report["verify"]["streams"] == 4
    assert not report["broken_streams"], report["broken_streams"]
    if shorter:
        assert not report["errors"], f"a stall shorter than the deadline must cost latency only: {report['errors']}"
    else:
        assert report["errors"].keys() <= RETRYABLE, report["errors"]
    assert server.process.poll() is None
    health = health_pb2_grpc.HealthStub(server.channel)
    wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
               == health_pb2.HealthCheckResponse.SERVING, 15, "the server to report SERVING")


def offset(server: ServerProcess, stream_id: str) -> int:
    try:
        return server.stub.GetStream(pb.GetStreamRequest(stream_id=stream_id), timeout=5).offset
    except grpc.RpcError:
        return 0


@pytest.mark.timeout(300)
def test_a_server_killed_in_the_middle_of_batches_is_continued_exactly(server: ServerProcess, redis: RedisServer,
                                                                        _servers: list[ServerProcess]) -> None:
    first = server
    address = first.address
    run = uuid.uuid4().hex[:6]
    rng = np.random.default_rng(9)
    streams = {f"kill-{run}-{n}": rng.normal(size=(60, 1)).astype(np.float32) for n in range(6)}
    got: dict[str, list[np.ndarray]] = {s: [] for s in streams}
    give_up = time.monotonic() + 200
    channel = grpc.insecure_channel(address)
    stub = stream_pb2_grpc.StreamInferenceStub(channel)

    def drive(stream: str) -> None:
        x = streams[stream]
        for start in range(0, 60, 6):
            message = request(stream, x[start:start + 6], start_offset=start, reset=start == 0)
            while True:  # retry by offset until a server answers: applied once, or replayed
                try:
                    reply = stub.Predict(message, timeout=5)
                    break
                except grpc.RpcError as error:
                    assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), error
                    assert time.monotonic() < give_up, "no server answered again"
                    time.sleep(0.2)
            assert reply.offset == start + 6
            got[stream].append(outputs(reply))

    with ThreadPoolExecutor(len(streams)) as pool:
        drivers = [pool.submit(drive, s) for s in streams]
        wait_until(lambda: sum(len(v) for v in got.values()) >= 12 or any(d.done() for d in drivers), 120,
                   "the first chunks to be answered")
        first.kill()  # SIGKILL: batches in flight die with it
        _servers.append(second := ServerProcess(redis.url, DEFAULT_MODEL, port=int(address.rsplit(":", 1)[1])))
        for driver in drivers:
            driver.result(timeout=240)
    channel.close()
    assert second.process.poll() is None
    references = keras_whole_sequences(DEFAULT_MODEL, list(streams.values()))
    for stream, expected in zip(streams, references, strict=True):
        diff = np.max(np.abs(np.concatenate(got[stream]) - expected))
        assert diff <= TOLERANCE, f"{stream}: {diff}"
