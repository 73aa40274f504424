"""The load loop: simulated sensors driving the server over grpc.aio, in one process or several.

Each stream is one coroutine that sends its chunks in order, one at a time: a stream's chunks must be
applied in order, so a second chunk in flight could only be refused. Load comes from many streams at
once, spread over several channels (each its own TCP connection) and optionally several processes.

- Closed loop: every stream sends its next chunk as soon as the previous one is answered; with
  `in_flight` below the number of streams a semaphore caps the chunks in flight in all.
- Open loop: every stream sends on a fixed schedule (`rate` chunks/s, phases spread over a period).
  A chunk whose predecessor is still unanswered goes out late; its lag is recorded, so a client or
  server that cannot keep up shows in the report instead of silently lowering the offered load.

Retries: a chunk failing with a retryable status (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, RESOURCE_EXHAUSTED,
CANCELLED from the server)
is resent with the same start_offset (or request_id), so the server applies it at most once and answers a
repeat of an applied chunk with `replayed`. The backoff and the retry loop are the client library's
(`lstm_stream.client.retry`, the one retry implementation of the repository); this module only records.
Any other error ends the stream's sequence: it is recorded as broken at that timestep, and the stream
starts a new sequence with a reset (at most `max_restarts` times).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue as queue_module
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
import numpy as np

from loadtest.config import LoadConfig
from loadtest.recorder import Recorder, Segment, Snapshot, StreamLog
from loadtest.sensors import Sensor
from lstm_stream.client.retry import RetryPolicy, retry_async
from lstm_stream.client.types import OFFSET_METADATA_KEY, ModelInfo, call_metadata, channel_credentials
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc as pb_grpc

# The server's idea of the stream differs from the tool's: its state was lost, reset or replaced.
STATE_ERRORS = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DATA_LOSS})
BAD_RESPONSE = "BAD_RESPONSE"
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_MESSAGE_LIMIT = 64 * 1024 * 1024
# A local subchannel pool gives every channel its own TCP connection; by default channels to one
# target share one, and "several channels" would still be one connection.
CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", _MESSAGE_LIMIT),
    ("grpc.max_send_message_length", _MESSAGE_LIMIT),
]
SNAPSHOT_INTERVAL_S = 0.5
# An open-loop chunk sent more than this share of its period after its schedule counts as late.
LATE_FRACTION = 0.1
_GOLDEN = 0.6180339887498949


class ConnectError(RuntimeError):
    """The server could not be reached or described itself unusably (exit code 2)."""


def output_rows(model: ModelInfo, timesteps: int) -> int:
    """Rows of the answer to a chunk: one per timestep, or one (its last step) for a last-step model."""
    return timesteps if model.per_timestep_outputs else 1


def _credentials(config: LoadConfig) -> grpc.ChannelCredentials | None:
    client_cert = (config.client_cert, config.client_key) if config.client_cert and config.client_key else None
    return channel_credentials(config.tls_ca, client_cert)  # type: ignore[arg-type]


def fetch_model(target: str, timeout_s: float, config: LoadConfig | None = None) -> ModelInfo:
    """GetModel, with a blocking channel: the one call made before any event loop exists."""
    credentials = _credentials(config) if config is not None else None
    metadata = call_metadata(config.api_key if config is not None else None)
    channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
    with channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
            info = pb_grpc.StreamInferenceStub(channel).GetModel(pb.GetModelRequest(), timeout=timeout_s,
                                                                 metadata=metadata)
        except grpc.FutureTimeoutError:
            raise ConnectError(f"no server answers at {target} (waited {timeout_s:g} s)") from None
        except grpc.RpcError as exc:
            raise ConnectError(f"GetModel at {target} failed: {exc.code().name}: {exc.details()}") from None
    return ModelInfo.from_proto(info)


class ChunkFailed(Exception):
    def __init__(self, code: grpc.StatusCode | str, message: str, server_offset: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.server_offset = server_offset

    @property
    def code_name(self) -> str:
        return self.code.name if isinstance(self.code, grpc.StatusCode) else self.code


def _offset_from(metadata: Any) -> int | None:
    for key, value in metadata or ():
        if key == OFFSET_METADATA_KEY:
            with contextlib.suppress(ValueError):
                return int(value)
    return None


class UnaryTransport:
    def __init__(self, stub: pb_grpc.StreamInferenceStub, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.stub = stub
        self.metadata = metadata

    async def send(self, request: pb.PredictRequest, timeout: float) -> pb.PredictResponse:
        try:
            return await self.stub.Predict(request, timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            raise ChunkFailed(exc.code(), exc.details() or "", _offset_from(exc.trailing_metadata())) from None

    async def close(self) -> None:
        pass


class StreamTransport:
    """One long-lived PredictStream call, the way a sensor keeps its connection; reopened after a break."""

    def __init__(self, stub: pb_grpc.StreamInferenceStub, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.stub = stub
        self.metadata = metadata
        self.call: Any = None

    async def send(self, request: pb.PredictRequest, timeout: float) -> pb.PredictResponse:
        if self.call is None:
            self.call = self.stub.PredictStream(metadata=self.metadata)
        call = self.call
        try:
            async with asyncio.timeout(timeout):
                await call.write(request)
                response = await call.read()
        except TimeoutError:
            self._drop()
            raise ChunkFailed(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:g} s") from None
        except grpc.aio.AioRpcError as exc:
            self._drop()
            raise ChunkFailed(exc.code(), exc.details() or "") from None
        except (grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            self._drop()
            raise ChunkFailed(grpc.StatusCode.UNAVAILABLE, f"stream broken: {exc}") from None
        if response is grpc.aio.EOF:
            self._drop()
            raise ChunkFailed(grpc.StatusCode.UNAVAILABLE, "the server ended the stream")
        if response.HasField("error"):
            code = _CODES.get(response.error.code, grpc.StatusCode.UNKNOWN)
            offset = response.offset if code == grpc.StatusCode.FAILED_PRECONDITION else None
            raise ChunkFailed(code, response.error.message, offset)
        return response

    def _drop(self) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None

    async def close(self) -> None:
        call, self.call = self.call, None
        if call is None:
            return
        try:
            async with asyncio.timeout(2.0):
                await call.done_writing()
                await call.code()
        except (TimeoutError, grpc.aio.AioRpcError, grpc.aio.UsageError):
            call.cancel()


class StreamDriver:
    """One simulated sensor: its signal, its position in the stream, and its chunks one by one."""

    def __init__(self, index: int, config: LoadConfig, model: ModelInfo, transport: UnaryTransport | StreamTransport,
                 recorder: Recorder, gate: asyncio.Semaphore | None, stop: asyncio.Event) -> None:
        self.index = index
        self.config = config
        self.model = model
        self.transport = transport
        self.recorder = recorder
        self.gate = gate
        self.stop = stop
        self.stream_id = config.stream_id(index)
        self.sensor = Sensor(config.seed + index, model.input_features)
        self.log = StreamLog(self.stream_id, config.seed + index) if config.verify else None
        if self.log is not None:
            recorder.logs[self.stream_id] = self.log
        self.offset = 0
        self.fresh = True  # the next chunk resets the stream: a rerun with the same ids starts over
        # The library's backoff (0.05 s doubling to 1 s, jittered), bounded by attempts rather than a deadline.
        self.retry = RetryPolicy(deadline_s=None, attempt_timeout_s=config.timeout_s, max_backoff_s=1.0,
                                 max_attempts=config.max_retries + 1)
        self.segment = 0
        self.restarts = 0
        self.stopped = False

    async def run(self, origin: float, deadline: float | None) -> None:
        config = self.config
        budget = config.chunk_budget(self.index)
        period = 1.0 / config.rate if config.rate else 0.0
        late_after = LATE_FRACTION * period
        # Spread the sensors' phases evenly over one period, so they do not all fire at once.
        next_at = origin + (self.index * _GOLDEN % 1.0) * period
        sent = 0
        self.recorder.active_streams += 1
        try:
            while (budget is None or sent < budget) and not self.stopped and not self.stop.is_set():
                lag = 0.0
                if config.open_loop:
                    if deadline is not None and next_at >= deadline:
                        break
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    lag = max(0.0, time.monotonic() - next_at)
                    next_at += period
                elif deadline is not None and time.monotonic() >= deadline:
                    break
                chunk = self.sensor.next(config.chunk_timesteps)
                if self.gate is None:
                    await self.send(chunk, origin, lag)
                else:
                    async with self.gate:
                        await self.send(chunk, origin, lag)
                if lag > late_after and config.open_loop:
                    self.recorder.late += 1
                sent += 1
        finally:
            self.recorder.active_streams -= 1

    def _request(self, chunk: np.ndarray) -> pb.PredictRequest:
        # tolist(): protobuf takes a list of Python floats about 3 times faster than a NumPy array.
        request = pb.PredictRequest(stream_id=self.stream_id, values=chunk.reshape(-1).tolist(),
                                    timesteps=chunk.shape[0], reset=self.fresh)
        if self.config.use_offsets:
            request.start_offset = self.offset
        else:
            # Without offsets a request id makes a retry safe: the server answers a repeat, not applies it.
            request.request_id = f"{self.segment}.{self.offset}"
        return request

    async def send(self, chunk: np.ndarray, origin: float, lag: float) -> bool:
        request = self._request(chunk)
        sent = time.monotonic()

        async def attempt(timeout: float) -> pb.PredictResponse:
            response = await self.transport.send(request, timeout)
            self._check(response, chunk.shape[0])
            return response

        def failed(error: BaseException, will_retry: bool) -> None:
            if isinstance(error, ChunkFailed):
                self.recorder.error(time.monotonic() - origin, error.code_name)
            if will_retry:
                self.recorder.retries += 1

        try:
            response = await retry_async(attempt, self.retry, on_error=failed, stop=self.stop.is_set)
        except ChunkFailed as failure:
            self._break(failure, time.monotonic() - origin)
            return False
        done = time.monotonic()
        if response.replayed:
            self.recorder.replays += 1
        self.recorder.chunk(sent - origin, done - sent, chunk.shape[0], lag)
        self.offset += chunk.shape[0]
        self.fresh = False
        if self.log is not None:
            segment = self.log.segments[-1]
            segment.inputs.append(chunk)
            segment.outputs.append(
                np.asarray(response.outputs, dtype=np.float32).reshape(response.timesteps, response.output_size)
            )
            segment.server_offsets.append(response.offset)
        return True

    def _check(self, response: pb.PredictResponse, timesteps: int) -> None:
        rows, columns = output_rows(self.model, timesteps), self.model.output_size
        if response.timesteps != rows or response.output_size != columns or len(response.outputs) != rows * columns:
            raise ChunkFailed(
                BAD_RESPONSE,
                f"expected {rows} x {columns} outputs, got timesteps={response.timesteps} "
                f"output_size={response.output_size} with {len(response.outputs)} values",
            )

    def _break(self, failure: ChunkFailed, when: float) -> None:
        """The chunk at self.offset was not applied (or cannot be known to be): this sequence is over."""
        self.recorder.failed_chunks += 1
        self.recorder.broken.append({
            "stream_id": self.stream_id,
            "segment": self.segment,
            "timestep": self.offset,
            "code": failure.code_name,
            "message": failure.message[:500],
            "server_offset": failure.server_offset,
            "state_lost": failure.code in STATE_ERRORS,
            "time_s": round(when, 3),
        })
        if self.restarts >= self.config.max_restarts:
            self.stopped = True
            return
        self.restarts += 1
        self.segment += 1
        self.offset = 0
        self.fresh = True
        if self.log is not None:
            self.log.segments.append(Segment())


class ProcessLoad:
    """The streams one process drives, over its own channels."""

    def __init__(self, config: LoadConfig, model: ModelInfo, indices: Iterable[int], recorder: Recorder) -> None:
        self.config = config
        self.model = model
        self.indices = list(indices)
        self.recorder = recorder
        self.channels: list[grpc.aio.Channel] = []
        self.transports: list[UnaryTransport | StreamTransport] = []

    async def connect(self) -> None:
        config = self.config
        credentials = _credentials(config)
        self.channels = [grpc.aio.insecure_channel(config.target, options=CHANNEL_OPTIONS) if credentials is None
                         else grpc.aio.secure_channel(config.target, credentials, options=CHANNEL_OPTIONS)
                         for _ in range(min(config.channels, len(self.indices)))]
        try:
            async with asyncio.timeout(config.connect_timeout_s):
                await asyncio.gather(*(channel.channel_ready() for channel in self.channels))
        except TimeoutError:
            await self.close()
            waited = config.connect_timeout_s
            raise ConnectError(f"no server answers at {config.target} (waited {waited:g} s)") from None
        stubs = [pb_grpc.StreamInferenceStub(channel) for channel in self.channels]
        kind = StreamTransport if config.api == "stream" else UnaryTransport
        # Streams take the channels in turn; unary streams could share a transport, but one each is as cheap.
        metadata = call_metadata(config.api_key)
        self.transports = [kind(stubs[n % len(stubs)], metadata) for n in range(len(self.indices))]

    async def run(self, origin: float, stop: asyncio.Event) -> None:
        config = self.config
        gate = None
        if config.in_flight is not None and config.in_flight < config.streams:
            # This process's share of the chunks in flight.
            share = max(1, round(config.in_flight * len(self.indices) / config.streams))
            gate = asyncio.Semaphore(share)
        drivers = [StreamDriver(index, config, self.model, transport, self.recorder, gate, stop)
                   for index, transport in zip(self.indices, self.transports, strict=True)]
        deadline = origin + config.warmup_s + config.duration_s if config.duration_s is not None else None
        delay = origin - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await asyncio.gather(*(driver.run(origin, deadline) for driver in drivers))

    async def cleanup(self) -> None:
        """Forget every stream's slot, so a load run leaves nothing waiting for the idle expiry."""
        if not self.channels:
            return
        stubs = [pb_grpc.StreamInferenceStub(channel) for channel in self.channels]
        limit = asyncio.Semaphore(64)

        async def reset(n: int, index: int) -> None:
            async with limit:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stubs[n % len(stubs)].ResetStream(
                        pb.ResetStreamRequest(stream_id=self.config.stream_id(index)), timeout=5,
                        metadata=call_metadata(self.config.api_key))

        await asyncio.gather(*(reset(n, index) for n, index in enumerate(self.indices)))

    async def close(self) -> None:
        await asyncio.gather(*(transport.close() for transport in self.transports), return_exceptions=True)
        await asyncio.gather(*(channel.close() for channel in self.channels), return_exceptions=True)


def _install_stop(stop: asyncio.Event) -> None:
    # The first Ctrl-C ends the load early but still reports what was measured; a second one aborts.
    def interrupted() -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, interrupted)


async def _drive(load: ProcessLoad, origin: float, source: int,
                 on_snapshot: Callable[[Snapshot], None] | None, shared_stop: Any = None) -> dict[str, Any]:
    stop = asyncio.Event()
    _install_stop(stop)

    async def follow_parent() -> None:
        # A worker also stops when only the parent was interrupted (a signal sent to its pid alone).
        while not stop.is_set():
            await asyncio.sleep(0.2)
            if shared_stop.is_set():
                stop.set()

    follower = asyncio.create_task(follow_parent()) if shared_stop is not None else None

    async def report() -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)
            on_snapshot(load.recorder.snapshot(source, time.monotonic() - origin))  # type: ignore[misc]

    reporter = asyncio.create_task(report()) if on_snapshot else None
    try:
        await load.run(origin, stop)
    finally:
        if follower is not None:
            follower.cancel()
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            on_snapshot(load.recorder.snapshot(source, time.monotonic() - origin))  # type: ignore[misc]
    if load.config.cleanup:
        await load.cleanup()
    await load.close()
    return load.recorder.export()


async def run_local(config: LoadConfig, model: ModelInfo,
                    on_snapshot: Callable[[Snapshot], None] | None = None) -> tuple[dict[str, Any], float]:
    """Every stream in this process. Returns the recording and the origin (monotonic seconds)."""
    load = ProcessLoad(config, model, range(config.streams), Recorder())
    await load.connect()
    origin = time.monotonic() + 0.05
    return await _drive(load, origin, 0, on_snapshot), origin


def _child(config: LoadConfig, model: ModelInfo, indices: list[int], source: int, messages: Any,
           start: Any, origin: Any, stop: Any) -> None:
    """A worker process: connect, say ready, wait for the common origin, drive its streams, send results."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # until the loop's own handler is installed

    async def main() -> None:
        load = ProcessLoad(config, model, indices, Recorder())
        try:
            await load.connect()
        except ConnectError as exc:
            messages.put(("connect_error", source, str(exc)))
            return
        messages.put(("ready", source, None))
        started = await asyncio.get_running_loop().run_in_executor(None, start.wait, 120.0)
        if not started:
            await load.close()
            messages.put(("error", source, "never told to start"))
            return
        result = await _drive(load, origin.value, source, lambda snapshot: messages.put(("progress", source, snapshot)),
                              stop)
        messages.put(("result", source, result))

    try:
        asyncio.run(main())
    except Exception as exc:  # reported to the parent, which raises it
        messages.put(("error", source, f"{type(exc).__name__}: {exc}"))


def run_processes(config: LoadConfig, model: ModelInfo,
                  on_snapshot: Callable[[Snapshot], None] | None = None) -> tuple[list[dict[str, Any]], float]:
    """Streams split over `config.processes` worker processes (spawned: no gRPC state is forked)."""
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    start = context.Event()
    stop = context.Event()
    origin = context.Value("d", 0.0)
    groups = [list(range(p, config.streams, config.processes)) for p in range(config.processes)]
    workers = [context.Process(target=_child, args=(config, model, group, p, messages, start, origin, stop),
                               name=f"lstm-loadtest-{p}", daemon=True) for p, group in enumerate(groups)]
    for worker in workers:
        worker.start()
    results: dict[int, dict[str, Any]] = {}
    try:
        ready: set[int] = set()
        # Spawning re-imports gRPC and NumPy in every worker: allow for that on a busy machine.
        _collect(workers, messages, lambda kind, source, payload: ready.add(source) if kind == "ready" else None,
                 lambda: len(ready) == len(workers), timeout_s=config.connect_timeout_s + 60)
        origin.value = time.monotonic() + 0.1
        start.set()

        def handle(kind: str, source: int, payload: Any) -> None:
            if kind == "progress" and on_snapshot is not None:
                on_snapshot(payload)
            elif kind == "result":
                results[source] = payload

        run_s = config.warmup_s + (config.duration_s or 0.0)
        # A run bounded only by a chunk count has no time bound of its own; every chunk has a deadline.
        limit = None if config.duration_s is None else run_s + (config.max_retries + 2) * (config.timeout_s + 1) + 60
        with _first_interrupt_stops(stop):
            _collect(workers, messages, handle, lambda: len(results) == len(workers), timeout_s=limit)
    finally:
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=5)
    return [results[p] for p in range(len(workers))], origin.value


@contextlib.contextmanager
def _first_interrupt_stops(stop: Any) -> Iterator[None]:
    """The first Ctrl-C tells the workers to wind down and report; a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupted(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _collect(workers: list[Any], messages: Any, handle: Callable[[str, int, Any], None],
             done: Callable[[], bool], timeout_s: float | None) -> None:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not done():
        if deadline is not None and time.monotonic() > deadline:
            raise RuntimeError(f"worker processes did not finish within {timeout_s:.0f} s")
        try:
            kind, source, payload = messages.get(timeout=0.25)
        except queue_module.Empty:
            dead = [w.name for w in workers if w.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"worker process {', '.join(dead)} died") from None
            continue
        if kind == "connect_error":
            raise ConnectError(payload)
        if kind == "error":
            raise RuntimeError(f"worker process {source} failed: {payload}")
        handle(kind, source, payload)
