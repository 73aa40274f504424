"""Exactly-once through faults, with the client library and no retry code in the tests.

Invariants 4, 8, 9 and 11 (docs/invariants.md) as a caller sees them: whatever breaks in the middle
of a stream, the caller gets every output exactly once, in order, equal to Keras on the whole
sequence. The faults: the server process SIGKILLed and restarted on its port; Redis paused (SIGSTOP)
for longer than an attempt's deadline, then resumed; the streaming connection cut by a TCP proxy, and
by a server restart (SIGTERM). Each fault is triggered from inside the caller's chunk source, so it
lands while chunks are in flight. Stream ids are fresh and carry no reset, so a late copy of a first
chunk can never rewind them (the server's side of that is invariant 10).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import numpy as np
import pytest

from devkit.processes import NO_WARMUP, RedisServer, ServerProcess, wait_until
from devkit.references import TOLERANCE, keras_whole_sequence
from devkit.tcp_proxy import TcpProxy
from lstm_stream.client import AsyncClient, Client, OutputsLost
from lstm_stream.v1 import stream_pb2 as pb
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(300)
CHUNK = 6
LENGTH = 120


def signal_and_timesteps(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(LENGTH, 1)).astype(np.float32)


def chunks(x: np.ndarray) -> list[np.ndarray]:
    return [x[start:start + CHUNK] for start in range(0, x.shape[0], CHUNK)]


def assert_exactly_once(x: np.ndarray, outputs: list[np.ndarray], what: str) -> None:
    assert len(outputs) == len(chunks(x)), f"{what}: {len(outputs)} answers for {len(chunks(x))} chunks"
    got = np.concatenate(outputs)
    expected = keras_whole_sequence(DEFAULT_MODEL, x)
    assert got.shape == expected.shape, what
    diff = float(np.max(np.abs(got - expected)))
    assert diff <= TOLERANCE, f"{what}: max abs diff {diff}"


async def unary_and_pipe(client: AsyncClient, fault_at: int, fault) -> None:  # type: ignore[no-untyped-def]
    """Two streams at once, one by unary send and one pipelined; the pipe's source fires the fault."""
    x_unary, x_pipe = signal_and_timesteps(1), signal_and_timesteps(2)
    fired = asyncio.Event()

    async def source() -> AsyncIterator[np.ndarray]:
        for number, chunk in enumerate(chunks(x_pipe)):
            if number == fault_at:
                await asyncio.to_thread(fault)
                fired.set()
            yield chunk

    async def unary() -> list[np.ndarray]:
        stream = client.stream(f"cf-u-{uuid.uuid4().hex[:6]}")
        outputs = []
        for number, chunk in enumerate(chunks(x_unary)):
            if number == fault_at:
                await fired.wait()  # the next send meets the fault
            outputs.append(await stream.send(chunk))
        return outputs

    async def piped() -> list[np.ndarray]:
        stream = client.stream(f"cf-p-{uuid.uuid4().hex[:6]}")
        return [out async for out in stream.pipe(source())]

    got_unary, got_pipe = await asyncio.gather(unary(), piped())
    assert_exactly_once(x_unary, got_unary, "unary")
    assert_exactly_once(x_pipe, got_pipe, "pipe")


class OwnServers:
    """Servers of a test's own, to stop or kill, and their restarts on the same port: lstm-serve on the
    session Redis with start_server's flags. A restart is left running at its test's end and is the next
    test's server here (a fresh process, like any other): one start-up fewer a test, of the 5 s each costs."""

    def __init__(self, redis_url: str, left_running: list[ServerProcess]) -> None:
        self._redis_url, self._left_running = redis_url, left_running
        self.taken: list[ServerProcess] = []  # stopped at the test's end

    def server(self) -> ServerProcess:
        while self._left_running:
            server = self._left_running.pop()
            self.taken.append(server)
            if server.process.poll() is None:
                return server
        self.taken.append(ServerProcess(self._redis_url, DEFAULT_MODEL, *NO_WARMUP))
        return self.taken[-1]

    def restart(self, port: int) -> ServerProcess:
        server = ServerProcess(self._redis_url, DEFAULT_MODEL, *NO_WARMUP, port=port)
        self._left_running.append(server)
        return server


@pytest.fixture(scope="module")
def _left_running() -> Iterator[list[ServerProcess]]:
    left: list[ServerProcess] = []
    yield left
    for server in left:
        server.stop()


@pytest.fixture
def own_servers(redis_server: RedisServer, _left_running: list[ServerProcess]) -> Iterator[OwnServers]:
    servers = OwnServers(redis_server.url, _left_running)
    yield servers
    for server in servers.taken:
        server.stop()


def test_server_killed_and_restarted_mid_stream(own_servers: OwnServers) -> None:
    server = own_servers.server()
    restarted: list[object] = []
    # The restart takes seconds (TensorFlow): meanwhile the client retries by itself. The client may finish
    # as soon as the new server listens, before the restart has seen it ready and returned, so the thread is
    # joined before the check (and before teardown, so that the new server is known and stopped in the end).
    restart = threading.Thread(target=lambda: restarted.append(own_servers.restart(server.port)), daemon=True)

    def kill_and_restart() -> None:
        server.kill()
        restart.start()

    async def main() -> None:
        async with AsyncClient(server.address, deadline=180, attempt_timeout=5) as client:
            await unary_and_pipe(client, fault_at=8, fault=kill_and_restart)

    asyncio.run(main())
    restart.join(timeout=120)
    assert restarted, "the server was restarted"


def test_redis_paused_past_the_attempt_deadline(default_server, redis_server: RedisServer) -> None:
    # The shared server and its Redis (pausing one costs no process, unlike killing it): Redis is resumed
    # in any case, and the test ends once the server's health (which follows Redis, polled each second) is
    # SERVING again, so the tests after it find the shared server as they would have.
    pid = redis_server.process.pid  # type: ignore[union-attr]
    try:
        def pause_redis() -> None:
            os.kill(pid, signal.SIGSTOP)
            # Three attempt deadlines later, Redis comes back with whatever it had queued.
            threading.Timer(3.0, os.kill, (pid, signal.SIGCONT)).start()

        async def main() -> None:
            async with AsyncClient(default_server.address, deadline=60, attempt_timeout=1) as client:
                await unary_and_pipe(client, fault_at=5, fault=pause_redis)

        asyncio.run(main())
    finally:
        os.kill(pid, signal.SIGCONT)
        wait_until(default_server._serving, 30, "the shared server's health to follow Redis back to SERVING")


def test_streaming_connection_cut_by_a_proxy_and_by_a_server_restart(own_servers: OwnServers) -> None:
    server = own_servers.server()
    proxy = TcpProxy(server.port)
    x = signal_and_timesteps(3)
    # The restart runs in a thread while the client retries; joined before teardown, so the new server is
    # known (it is registered once it is ready) and stopped in the end (else it outlives the suite).
    restart = threading.Thread(target=own_servers.restart, args=(server.port,), daemon=True)
    try:
        with Client(proxy.address, deadline=180, attempt_timeout=5) as client:

            def source():  # type: ignore[no-untyped-def]
                for number, chunk in enumerate(chunks(x)):
                    if number == 5:
                        proxy.sever()  # the TCP connection dies under the open PredictStream
                    if number == 12:
                        server.stop()  # SIGTERM: the server ends the stream and goes away
                        restart.start()
                    yield chunk

            stream = client.stream(f"cf-cut-{uuid.uuid4().hex[:6]}")
            outputs = list(stream.pipe(source()))
        assert proxy.connections >= 3, "the proxy saw the reconnections"
        assert_exactly_once(x, outputs, "pipe through a cut and a restart")
    finally:
        if restart.is_alive():
            restart.join(120)
        proxy.close()


WINDOW = 8  # lstm_stream.client.defaults.PIPE_WINDOW, the server's default --replay-window


def applied_unanswered_then(server, proxy: TcpProxy, stream_id: str, stream, answered: int, applied: int,  # type: ignore[no-untyped-def]
                            fault) -> Callable[[list[np.ndarray]], Iterator[np.ndarray]]:
    """A chunk source for `pipe()`: chunks 0..answered-1 are answered; then the proxy drops the server's
    answers while it applies chunks up to `applied` (so several applied chunks are unanswered, all in
    the window), and then `fault()` breaks the call."""

    def server_offset() -> int:  # asked of the server directly: the proxy is holding answers
        return server.stub.GetStream(pb.GetStreamRequest(stream_id=stream_id), timeout=5).offset

    def break_once_applied() -> None:
        wait_until(lambda: server_offset() == applied * CHUNK, 30, f"chunks {answered}-{applied - 1} applied")
        fault()

    def source(all_chunks: list[np.ndarray]) -> Iterator[np.ndarray]:
        for number, chunk in enumerate(all_chunks):
            if number == answered:
                # Everything before this chunk answered; from here the answers are dropped.
                wait_until(lambda: stream.offset == answered * CHUNK, 30, f"chunks 0-{answered - 1} answered")
                proxy.hold_answers()
            if number == applied - 1:
                threading.Thread(target=break_once_applied, daemon=True).start()
            yield chunk

    return source


def test_window_8_through_a_proxy_cut_gets_every_output_once(default_server) -> None:
    """Issue 24: with a window up to the server's replay window, a break loses no answer. The proxy
    drops the server's answers while it applies a full window of 8 chunks, then cuts the connection; the
    client resends the 8 (answered `replayed`, not applied again) and the rest: every output, in order,
    equal to Keras, no OutputsLost, and the stream ends exactly at its length (nothing applied twice)."""
    proxy = TcpProxy(default_server.port)
    x = signal_and_timesteps(4)
    stream_id = f"cf-win-{uuid.uuid4().hex[:6]}"
    try:
        with Client(proxy.address, deadline=60, attempt_timeout=20) as client:
            stream = client.stream(stream_id)
            source = applied_unanswered_then(default_server, proxy, stream_id, stream, answered=4, applied=12,
                                             fault=proxy.sever)
            outputs = list(stream.pipe(source(chunks(x)), window=WINDOW))
            assert stream.offset == LENGTH
        assert proxy.connections >= 2, "the proxy saw the reconnection"
        assert_exactly_once(x, outputs, "window 8 through a proxy cut")
        info = default_server.stub.GetStream(pb.GetStreamRequest(stream_id=stream_id), timeout=30)
        assert info.offset == LENGTH
    finally:
        proxy.close()


def test_window_8_through_a_server_kill_and_restart_gets_every_output_once(own_servers: OwnServers) -> None:
    """The same with the server SIGKILLed while 8 applied chunks are unanswered, and started again on its
    port: the answers are kept with the slot in Redis, so the new process replays them."""
    server = own_servers.server()
    proxy = TcpProxy(server.port)
    x = signal_and_timesteps(5)
    stream_id = f"cf-kill-{uuid.uuid4().hex[:6]}"
    restart = threading.Thread(target=own_servers.restart, args=(server.port,), daemon=True)

    def kill_and_restart() -> None:
        server.kill()
        proxy.sever()
        restart.start()

    try:
        with Client(proxy.address, deadline=180, attempt_timeout=5) as client:
            stream = client.stream(stream_id)
            source = applied_unanswered_then(server, proxy, stream_id, stream, answered=4, applied=12,
                                             fault=kill_and_restart)
            outputs = list(stream.pipe(source(chunks(x)), window=WINDOW))
            assert stream.offset == LENGTH
            assert client.stream_info(stream_id).offset == LENGTH  # nothing applied twice
        assert_exactly_once(x, outputs, "window 8 through a server kill and restart")
    finally:
        if restart.is_alive():
            restart.join(120)
        proxy.close()


def test_a_window_wider_than_the_servers_names_lost_answers_and_never_duplicates(start_server) -> None:
    """OutputsLost remains only for a window larger than the server keeps: with `--replay-window 2`, 8
    applied chunks lose their answers in a break; the retry of the oldest is refused as no longer kept,
    and the client says exactly which timesteps' answers are gone, never repeats an output, never skips
    one silently, and the stream continues exactly."""
    server = start_server("--replay-window", "2")
    proxy = TcpProxy(server.port)
    x = signal_and_timesteps(6)
    stream_id = f"cf-wide-{uuid.uuid4().hex[:6]}"
    delivered: list[np.ndarray] = []
    try:
        with Client(proxy.address, deadline=60, attempt_timeout=20) as client:
            stream = client.stream(stream_id)
            all_chunks = chunks(x)
            source = applied_unanswered_then(server, proxy, stream_id, stream, answered=4, applied=12,
                                             fault=proxy.sever)
            with pytest.raises(OutputsLost) as caught:
                for out in stream.pipe(source(all_chunks), window=WINDOW):
                    delivered.append(out)
            lost = caught.value
            assert (lost.lost_from, lost.lost_to, lost.server_offset) == (4 * CHUNK, 12 * CHUNK, 12 * CHUNK)
            assert "no longer kept" in str(lost)
            assert stream.offset == 12 * CHUNK
            rest = list(stream.pipe(all_chunks[12:]))
        expected = keras_whole_sequence(DEFAULT_MODEL, x)
        got = np.concatenate(delivered + rest)
        want = np.concatenate([expected[: 4 * CHUNK], expected[12 * CHUNK:]])
        assert got.shape == want.shape
        assert float(np.max(np.abs(got - want))) <= TOLERANCE
    finally:
        proxy.close()
