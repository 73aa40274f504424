"""The simulated sensors: `StreamDriver` sends one stream's chunks, `ProcessLoad` drives the streams of
one process over its channels (engine.py runs it in one process or several; transports.py sends).

Each stream is one coroutine that sends its chunks in order, one at a time: a stream's chunks must be
applied in order, so a second chunk in flight could only be refused. Load comes from many streams at
once, spread over several channels (each its own TCP connection) and optionally several processes.

- Closed loop: every stream sends its next chunk as soon as the previous one is answered; with
  `in_flight` below the number of streams a semaphore caps the chunks in flight in all.
- Open loop: every stream sends on a fixed schedule (`rate` chunks/s, phases spread over a period).
  A chunk whose predecessor is still unanswered goes out late; its lag is recorded, so a client or
  server that cannot keep up shows in the report instead of silently lowering the offered load.

Retries: a chunk failing with a retryable status (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, RESOURCE_EXHAUSTED,
CANCELLED from the server), or whose call the transport or a proxy ended (a break: Envoy's `INTERNAL: Stream
removed` when a replica dies under a PredictStream, a stream that ends with the chunk unanswered;
transports.py), is resent with the same start_offset (or request_id) on a new call, so the server applies
it at most once and answers a repeat of an applied chunk with `replayed`. The backoff and the retry loop
are the client library's (`lstm_stream.client.retry`, the one retry implementation of the repository);
this module only records.
Any other error ends the stream's sequence: it is recorded as broken at that timestep, and the stream
starts a new sequence with a reset (at most `max_restarts` times).

Models and versions: every chunk names `--model-name`; with `--sequence-chunks N` a stream's sequence ends
after N chunks and the next starts a new one (on the newest version). Each answer's model version is
counted; an answer that moved the stream off a retired version (a migration, `lstm-serve
--on-retired-version reset`) started a new sequence: the stream continues from the answer's offset, and the
verifier sees a new sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable

import grpc
import numpy as np

from loadtest.config import LoadConfig
from loadtest.gateways import ChunkAnswer, GatewayTransport
from loadtest.live_verify import LiveFeed
from loadtest.recorder import Recorder
from loadtest.sensors import Sensor
from loadtest.transports import (
    BAD_RESPONSE,
    ChunkFailed,
    ConnectError,
    StreamTransport,
    UnaryTransport,
    aio_channel,
)
from lstm_stream.client.retry import RetryPolicy, retry_async
from lstm_stream.client.types import ModelInfo, call_metadata
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc as pb_grpc

Transport = UnaryTransport | StreamTransport | GatewayTransport
# The server's idea of the stream differs from the tool's: its state was lost, reset or replaced.
STATE_ERRORS = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DATA_LOSS})
# An open-loop chunk sent more than this share of its period after its schedule counts as late.
LATE_FRACTION = 0.1
_GOLDEN = 0.6180339887498949


def output_rows(model: ModelInfo, timesteps: int) -> int:
    """Rows of the answer to a chunk: one per timestep, or one (its last step) for a last-step model."""
    return timesteps if model.per_timestep_outputs else 1


class StreamDriver:
    """One simulated sensor: its signal, its position in the stream, and its chunks one by one."""

    def __init__(self, index: int, config: LoadConfig, model: ModelInfo, transport: Transport,
                 recorder: Recorder, gate: asyncio.Semaphore | None, stop: asyncio.Event,
                 feed: LiveFeed | None = None) -> None:
        self.index = index
        self.config = config
        self.model = model
        self.transport = transport
        self.recorder = recorder
        self.gate = gate
        self.stop = stop
        self.stream_id = config.stream_id(index)
        self.sensor = Sensor(config.seed + index, model.input_features)
        self.feed = feed  # --verify: every answered chunk goes to the live verifier
        self.packs_values = isinstance(transport, GatewayTransport)
        self.offset = 0
        self.fresh = True  # the next chunk resets the stream: a rerun with the same ids starts over
        # The library's backoff (0.05 s doubling to 1 s, jittered), bounded by attempts rather than a deadline.
        self.retry = RetryPolicy(deadline_s=None, attempt_timeout_s=config.timeout_s, max_backoff_s=1.0,
                                 max_attempts=config.max_retries + 1)
        self.segment = 0
        self.segment_chunks = 0  # chunks of the current sequence (--sequence-chunks)
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
        request = pb.PredictRequest(stream_id=self.stream_id, timesteps=chunk.shape[0], reset=self.fresh,
                                    model=self.config.model_name)
        if not self.packs_values:  # a gateway sends every chunk's values in one block
            # tolist(): protobuf takes a list of Python floats about 3 times faster than a NumPy array.
            request.values.extend(chunk.reshape(-1).tolist())
        if self.config.use_offsets:
            request.start_offset = self.offset
        else:
            # Without offsets a request id makes a retry safe: the server answers a repeat, not applies it.
            request.request_id = f"{self.segment}.{self.offset}"
        return request

    async def send(self, chunk: np.ndarray, origin: float, lag: float) -> bool:
        request = self._request(chunk)
        sent = time.monotonic()

        async def attempt(timeout: float) -> pb.PredictResponse | ChunkAnswer:
            if isinstance(self.transport, GatewayTransport):
                response = await self.transport.send(request, timeout, chunk)
            else:
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
        self.recorder.version_chunks[response.model_version] += 1
        migrated = (response.migrated_from if isinstance(response, ChunkAnswer)
                    else response.HasField("migration"))
        if migrated:
            self.recorder.migrations += 1
        if migrated and response.offset != self.offset + chunk.shape[0]:
            # "reset": a new sequence from zero state on the answering version; the answer's offset is its offset.
            self.segment += 1
            self.segment_chunks = 0
            self.offset = response.offset
        else:
            self.offset += chunk.shape[0]
        self.fresh = False
        self.segment_chunks += 1
        if self.feed is not None:
            outputs = np.asarray(response.outputs, dtype=np.float32).reshape(response.timesteps, response.output_size)
            self.feed.chunk(self.stream_id, self.segment, chunk, outputs, response.offset, response.model_version)
        if self.config.sequence_chunks is not None and self.segment_chunks >= self.config.sequence_chunks:
            self._next_sequence()
        return True

    def _next_sequence(self) -> None:
        """The next chunk starts a new sequence (with `reset`), on the newest version."""
        self.segment += 1
        self.segment_chunks = 0
        self.offset = 0
        self.fresh = True

    def _check(self, response: pb.PredictResponse | ChunkAnswer, timesteps: int) -> None:
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
        self._next_sequence()


class ProcessLoad:
    """The streams one process drives, over its own channels."""

    def __init__(self, config: LoadConfig, model: ModelInfo, indices: Iterable[int], recorder: Recorder,
                 feed: LiveFeed | None = None) -> None:
        self.config = config
        self.model = model
        self.indices = list(indices)
        self.recorder = recorder
        self.feed = feed
        self.channels: list[grpc.aio.Channel] = []
        self.transports: list[Transport] = []  # one per stream (a gateway's is shared by its streams)
        self.gateways: list[GatewayTransport] = []

    async def connect(self) -> None:
        config = self.config
        # With gateways, each gateway has its own connection; this process takes its share of them.
        gateways = max(1, round(config.gateways * len(self.indices) / config.streams)) if config.gateways else 0
        connections = gateways or min(config.channels, len(self.indices))
        self.channels = [aio_channel(config) for _ in range(connections)]
        try:
            async with asyncio.timeout(config.connect_timeout_s):
                await asyncio.gather(*(channel.channel_ready() for channel in self.channels))
        except TimeoutError:
            await self.close()
            waited = config.connect_timeout_s
            raise ConnectError(f"no server answers at {config.target} (waited {waited:g} s)") from None
        stubs = [pb_grpc.StreamInferenceStub(channel) for channel in self.channels]
        metadata = call_metadata(config.api_key)
        if gateways:
            self.gateways = [GatewayTransport(stub, self.recorder, metadata, streaming=config.api == "stream",
                                              max_chunks=self.model.max_batch_chunks or 1024) for stub in stubs]
            self.transports = [self.gateways[n % gateways] for n in range(len(self.indices))]
            return
        kind = StreamTransport if config.api == "stream" else UnaryTransport
        # Streams take the channels in turn; unary streams could share a transport, but one each is as cheap.
        self.transports = [kind(stubs[n % len(stubs)], metadata) for n in range(len(self.indices))]

    async def run(self, origin: float, stop: asyncio.Event) -> None:
        config = self.config
        gate = None
        if config.in_flight is not None and config.in_flight < config.streams:
            # This process's share of the chunks in flight.
            share = max(1, round(config.in_flight * len(self.indices) / config.streams))
            gate = asyncio.Semaphore(share)
        drivers = [StreamDriver(index, config, self.model, transport, self.recorder, gate, stop, self.feed)
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
                        pb.ResetStreamRequest(stream_id=self.config.stream_id(index), model=self.config.model_name),
                        timeout=5,
                        metadata=call_metadata(self.config.api_key))

        await asyncio.gather(*(reset(n, index) for n, index in enumerate(self.indices)))

    async def close(self) -> None:
        unique = list({id(transport): transport for transport in self.transports}.values())
        await asyncio.gather(*(transport.close() for transport in unique), return_exceptions=True)
        await asyncio.gather(*(channel.close() for channel in self.channels), return_exceptions=True)
