"""Bidirectional streams, shared by both protocols: requests are handed to the data plane as they
arrive (the batcher keeps each stream's order), answers leave in request order, and a failed request
is answered with an error message while the stream goes on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from server.api.errors import as_service_error
from server.errors import ServiceError

# Requests of one connection in flight before reading pauses: one connection cannot flood memory.
STREAM_WINDOW = 64

Request = TypeVar("Request")
Handle = TypeVar("Handle")
Response = TypeVar("Response")


async def answer_in_order(
    requests: AsyncIterator[Request],
    start: Callable[[Request], Handle],
    finish: Callable[[Handle], Awaitable[Response]],
    fail: Callable[[Request, ServiceError], Response],
) -> AsyncIterator[Response]:
    """`start` validates and submits a request without waiting (raising ServiceError for a bad one),
    `finish` waits for its answer, `fail` turns an error into that protocol's error response."""
    pending: asyncio.Queue[tuple[Request, Handle | ServiceError] | None] = asyncio.Queue(STREAM_WINDOW)

    async def read() -> None:
        try:
            async for request in requests:
                try:
                    handle: Handle | ServiceError = start(request)
                except ServiceError as exc:
                    handle = exc
                await pending.put((request, handle))
        finally:
            await pending.put(None)

    reader = asyncio.create_task(read())
    try:
        while (item := await pending.get()) is not None:
            request, handle = item
            if isinstance(handle, ServiceError):
                yield fail(request, handle)
                continue
            try:
                yield await finish(handle)
            except Exception as exc:
                yield fail(request, as_service_error(exc))
        await reader  # surfaces a broken request stream
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
