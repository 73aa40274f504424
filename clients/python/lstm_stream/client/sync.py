"""The blocking client: `Client` and `Stream`, the same API as `AsyncClient` and `AsyncStream`.

Why a private event loop instead of grpc's blocking stubs: the retry, resume and pipelining rules are
subtle, and one implementation of them (in `aio.py`) is easier to trust than two. Each `Client` runs
one event loop on a daemon thread; every method hands its coroutine to that loop and waits.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np

from lstm_stream.client import defaults
from lstm_stream.client.aio import AsyncClient, AsyncStream
from lstm_stream.client.retry import RetryPolicy
from lstm_stream.client.types import ModelInfo, Pem, StreamInfo

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

    def model(self) -> ModelInfo:
        """The hosted model: features, outputs, limits, fingerprint."""
        return self._loop.run(self._async.model())

    def health(self, service: str = "") -> str:
        """grpc.health.v1 status: "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN"."""
        return self._loop.run(self._async.health(service))

    def stream(self, stream_id: str) -> Stream:
        """A handle on one stream, at offset 0 (see `AsyncClient.stream`)."""
        return Stream(self, self._async.stream(stream_id))

    def stream_info(self, stream_id: str) -> StreamInfo:
        return self._loop.run(self._async.stream_info(stream_id))

    def reset_stream(self, stream_id: str) -> bool:
        return self._loop.run(self._async.reset_stream(stream_id))


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

    def start_new(self) -> None:
        self._handle.start_new()

    def pipe(self, chunks: Iterable[Any], *, window: int = defaults.PIPE_WINDOW) -> Iterator[np.ndarray]:
        """Pipelined streaming (see `AsyncStream.pipe`): yields each chunk's outputs in order. `chunks`
        is read on a worker thread, so a source that blocks (a sensor) does not stall the answers."""
        outputs: AsyncIterator[np.ndarray] = self._handle.pipe(_pulled(chunks), window=window)
        try:
            while True:
                item = self._run(_next(outputs))
                if item is _END:
                    return
                yield item  # type: ignore[misc]
        finally:
            self._run(outputs.aclose())  # type: ignore[attr-defined]


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
