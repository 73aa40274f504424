"""The blocking client: `Client`, `Stream` and `Gateway`, the same API as `AsyncClient`, `AsyncStream` and
`AsyncGateway`.

Why a private event loop instead of grpc's blocking stubs: the retry, resume and pipelining rules are
subtle, and one implementation of them (in `aio.py`) is easier to trust than two. Each `Client` runs
one event loop on a daemon thread; every method hands its coroutine to that loop and waits.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np

from lstm_stream.client import defaults
from lstm_stream.client.aio import AsyncClient, AsyncStream
from lstm_stream.client.gateway import AsyncGateway, GatewayResult, Tick
from lstm_stream.client.retry import RetryPolicy
from lstm_stream.client.types import Migration, ModelInfo, ModelVersionStatus, Pem, StreamInfo, StreamState

T = TypeVar("T")
_END = object()


class _Loop:
    """An event loop on its own daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="lstm-stream-client", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. Ctrl-C in the caller's thread: stop the work on the loop too
            raise

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()


class Client:
    """A connection to one lstm-serve server; see `AsyncClient` for the arguments.

    >>> with Client("127.0.0.1:50051") as client:
    ...     stream = client.stream("sensor-42")
    ...     outputs = stream.send(samples)   # [timesteps, outputs] numpy array
    """

    def __init__(self, target: str = defaults.TARGET, *, tls_ca: Pem | None = None,
                 client_cert: tuple[Pem, Pem] | None = None, api_key: str | None = None,
                 deadline: float = defaults.DEADLINE_S, attempt_timeout: float = defaults.ATTEMPT_TIMEOUT_S,
                 retry: RetryPolicy | None = None,
                 tls_server_name: str | None = None, options: tuple[tuple[str, Any], ...] = ()) -> None:
        self._loop = _Loop()

        async def make() -> AsyncClient:  # grpc.aio channels belong to the loop they are made on
            return AsyncClient(target, tls_ca=tls_ca, client_cert=client_cert, api_key=api_key, deadline=deadline,
                               attempt_timeout=attempt_timeout, retry=retry, tls_server_name=tls_server_name,
                               options=options)

        self._async = self._loop.run(make())
        self.target = target
        self.retry = self._async.retry

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.loop.is_closed():
            return
        self._loop.run(self._async.close())
        self._loop.close()

    def model(self, name: str = "", version: int = 0) -> ModelInfo:
        """A hosted model: features, outputs, limits, fingerprint, version (see `AsyncClient.model`)."""
        return self._loop.run(self._async.model(name, version))

    def models(self) -> list[ModelVersionStatus]:
        """Every model version the server knows and where it stands (ListModels)."""
        return self._loop.run(self._async.models())

    def load_model(self, name: str) -> None:
        """Load what the model's folder and version policy serve (see `AsyncClient.load_model`)."""
        self._loop.run(self._async.load_model(name))

    def unload_model(self, name: str, version: int = 0) -> None:
        """Retire one version of a model, or every one with 0 (see `AsyncClient.unload_model`)."""
        self._loop.run(self._async.unload_model(name, version))

    def health(self, service: str = "") -> str:
        """grpc.health.v1 status: "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN"."""
        return self._loop.run(self._async.health(service))

    def stream(self, stream_id: str, *, model: str = "", version: int = 0) -> Stream:
        """A handle on one stream of `model`, at offset 0 (see `AsyncClient.stream`)."""
        return Stream(self, self._async.stream(stream_id, model=model, version=version))

    def gateway(self, *, max_message_timesteps: int = defaults.MESSAGE_TIMESTEPS, model: str = "",
                version: int = 0) -> Gateway:
        """Many streams' chunks per message on this connection (see `AsyncClient.gateway`)."""
        return Gateway(self, self._async.gateway(max_message_timesteps=max_message_timesteps, model=model,
                                                 version=version))

    def stream_info(self, stream_id: str, *, model: str = "") -> StreamInfo:
        return self._loop.run(self._async.stream_info(stream_id, model=model))

    def reset_stream(self, stream_id: str, *, model: str = "") -> bool:
        return self._loop.run(self._async.reset_stream(stream_id, model=model))

    def get_state(self, stream_id: str, *, model: str = "") -> StreamState:
        """The stream's recurrent state and offset (see `AsyncClient.get_state`)."""
        return self._loop.run(self._async.get_state(stream_id, model=model))

    def set_state(self, stream_id: str, state: StreamState, *, offset: int | None = None,
                  model: str | None = None) -> int:
        """Set the stream's state and offset (see `AsyncClient.set_state`); returns the offset."""
        return self._loop.run(self._async.set_state(stream_id, state, offset=offset, model=model))


class Stream:
    """One stream, keeping its offset; see `AsyncStream` for what each method promises."""

    def __init__(self, client: Client, handle: AsyncStream) -> None:
        self._client = client
        self._handle = handle
        self._run = client._loop.run

    @property
    def stream_id(self) -> str:
        return self._handle.stream_id

    @property
    def offset(self) -> int:
        """Timesteps the server has consumed since the sequence began, as far as this handle knows."""
        return self._handle.offset

    @property
    def model(self) -> str:
        return self._handle.model

    @property
    def model_version(self) -> int:
        """The model version that answered the last chunk (0 before any)."""
        return self._handle.model_version

    @property
    def migration(self) -> Migration | None:
        """How the server moved the stream off a retired version for the last chunk; None: it did not."""
        return self._handle.migration

    def send(self, values: Any) -> np.ndarray:
        return self._run(self._handle.send(values))

    def end(self, values: Any = None) -> np.ndarray | None:
        return self._run(self._handle.end(values))

    def reset(self) -> bool:
        return self._run(self._handle.reset())

    def info(self) -> StreamInfo:
        return self._run(self._handle.info())

    def resume(self) -> int:
        return self._run(self._handle.resume())

    def get_state(self) -> StreamState:
        return self._run(self._handle.get_state())

    def set_state(self, state: StreamState, *, offset: int | None = None) -> int:
        """Set the stream's state; the handle moves to its offset (see `AsyncStream.set_state`)."""
        return self._run(self._handle.set_state(state, offset=offset))

    def start_new(self) -> None:
        self._handle.start_new()

    def pipe(self, chunks: Iterable[Any], *, window: int = defaults.PIPE_WINDOW) -> Iterator[np.ndarray]:
        """Pipelined streaming (see `AsyncStream.pipe`): yields each chunk's outputs in order. `chunks`
        is read on a worker thread, so a source that blocks (a sensor) does not stall the answers."""
        return _iterate(self._run, self._handle.pipe(_pulled(chunks), window=window))


class Gateway:
    """Many streams' chunks per message over one connection; see `AsyncGateway` (gateway.py) for what
    each method promises."""

    def __init__(self, client: Client, gateway: AsyncGateway) -> None:
        self._client = client
        self._gateway = gateway
        self._run = client._loop.run

    @property
    def streams(self) -> Mapping[str, Stream]:
        """A handle on every stream this gateway has sent to (the same state the gateway uses)."""
        return {stream_id: Stream(self._client, handle)  # type: ignore[arg-type]
                for stream_id, handle in self._gateway.streams.items()}

    def offset(self, stream_id: str) -> int:
        return self._gateway.offset(stream_id)

    def start_new(self, stream_id: str) -> None:
        self._gateway.start_new(stream_id)

    def resume(self, stream_id: str) -> int:
        return self._run(self._gateway.resume(stream_id))

    def reset(self, stream_id: str) -> bool:
        return self._run(self._gateway.reset(stream_id))

    def end(self, stream_id: str, values: Any = None) -> np.ndarray | None:
        return self._run(self._gateway.end(stream_id, values))

    def send(self, values: Mapping[str, Any], *, end: Iterable[str] = (),
             start_new: Iterable[str] = ()) -> GatewayResult:
        return self._run(self._gateway.send(values, end=end, start_new=start_new))

    def pipe(self, ticks: Iterable[Mapping[str, Any] | Tick], *,
             window: int = defaults.PIPE_WINDOW) -> Iterator[GatewayResult]:
        """Pipelined ticks (see `AsyncGateway.pipe`): yields each tick's result in order; `ticks` is read on
        a worker thread."""
        return _iterate(self._run, self._gateway.pipe(_pulled(ticks), window=window))


def _iterate(run: Callable[[Coroutine[Any, Any, Any]], Any], outputs: AsyncIterator[T]) -> Iterator[T]:
    """An async iterator on the client's loop, read from the caller's thread."""
    try:
        while True:
            item = run(_next(outputs))
            if item is _END:
                return
            yield item
    finally:
        run(outputs.aclose())  # type: ignore[attr-defined]


async def _next(iterator: AsyncIterator[T]) -> T | object:
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return _END


async def _pulled(chunks: Iterable[Any]) -> AsyncIterator[Any]:
    """A blocking iterable, read in the loop's default executor (StopIteration cannot cross a future)."""
    iterator = iter(chunks)
    loop = asyncio.get_running_loop()
    while (chunk := await loop.run_in_executor(None, next, iterator, _END)) is not _END:
        yield chunk
