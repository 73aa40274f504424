"""Bidirectional streams, shared by both protocols: requests are handed to the data plane as they
arrive (the batcher keeps each stream's order), answers leave in request order, and a failed request
is answered with an error message while the stream goes on.

Two promises live here:
- Invariant 12 (docs/invariants.md), bounded resources: a connection holds at most `window` requests
  and `window_bytes` bytes of requests whose answers it has not yet written. When the window is full
  the reader stops reading, so HTTP/2 flow control pushes back on the client: one that never reads
  its answers and keeps sending costs the server a fixed budget, not memory without end.
- Invariant 11, resume after a break: when the call breaks (client cancel, disconnect, deadline),
  every request not yet answered is abandoned. The batcher drops abandoned chunks it has not started
  (never run later); one already in a running batch finishes, so each chunk is applied once or not
  at all and the stream's offset stops at a chunk boundary a reconnecting client can resume from.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from server.api.errors import as_service_error
from server.api.malformed import Malformed
from server.errors import ServiceError, malformed_message


@dataclass(frozen=True, slots=True)
class StreamWindow:
    """Per-connection budget: requests read but not yet answered (ServerConfig's stream_window*)."""

    requests: int
    bytes: int


class Sized(Protocol):
    def ByteSize(self) -> int: ...


Request = TypeVar("Request", bound=Sized)
Handle = TypeVar("Handle")
Response = TypeVar("Response")


async def answer_in_order(
    requests: AsyncIterator[Request],
    start: Callable[[Request], Handle],
    finish: Callable[[Handle], Awaitable[Response]],
    fail: Callable[[Request, ServiceError], Response],
    abandon: Callable[[list[Handle]], None],
    window: StreamWindow,
) -> AsyncIterator[Response]:
    """`start` validates and submits a request without waiting (raising ServiceError for a bad one),
    `finish` waits for its answer, `fail` turns an error into that protocol's error response, and
    `abandon` tells the data plane nobody will read a submitted request's answer (drop it if not started)."""
    pending: asyncio.Queue[tuple[Request, Handle | ServiceError, int] | None] = asyncio.Queue()
    unanswered: deque[Handle] = deque()  # submitted, answer not yet written, in request order
    held = [0, 0]  # requests and bytes read but not yet answered
    room = asyncio.Event()

    async def read() -> None:
        try:
            async for request in requests:
                size = request.ByteSize()
                # Wait for room before submitting: what is not read stays in the client's HTTP/2 window.
                while held[0] and (held[0] >= window.requests or held[1] + size > window.bytes):
                    room.clear()
                    await room.wait()
                held[0] += 1
                held[1] += size
                handle: Handle | ServiceError
                if isinstance(request, Malformed):  # answered like any bad request; the stream goes on
                    handle, request = malformed_message(request.problem), request.empty
                else:
                    try:
                        handle = start(request)
                    except ServiceError as exc:
                        handle = exc
                    else:
                        unanswered.append(handle)
                pending.put_nowait((request, handle, size))
        finally:
            pending.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (item := await pending.get()) is not None:
            request, handle, size = item
            if isinstance(handle, ServiceError):
                response = fail(request, handle)
            else:
                try:
                    response = await finish(handle)
                except Exception as exc:
                    response = fail(request, as_service_error(exc))
                unanswered.popleft()
            del request, handle
            yield response
            held[0] -= 1
            held[1] -= size
            room.set()
        await reader  # surfaces a broken request stream
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        # The call ended before these were answered (a broken stream): nobody will read their answers.
        if unanswered:
            abandon(list(unanswered))
