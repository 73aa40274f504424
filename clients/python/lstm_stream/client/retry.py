"""The one retry implementation of the repository: jittered exponential backoff within a deadline.

Retrying a chunk is safe only because it carries its `start_offset` (and a `request_id`): the server
applies a chunk at most once and answers a repeat of one of the last applied chunks of its stream with
its stored answer (`replayed`), invariants 4 and 11 in the server's docs/invariants.md. So every status
that may mean "not applied" or "not known" is retried with the very same request, and so is a call
ended by the transport or a proxy (`is_break`: UNAVAILABLE, CANCELLED, or an INTERNAL/UNKNOWN the server
did not send, such as Envoy's `INTERNAL: Stream removed`): a break counts as UNAVAILABLE.

`lstm-loadtest` uses this module too (through `retry_async`, with its own bookkeeping in `on_error`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from lstm_stream.client import defaults
from lstm_stream.wire import is_transport_break

T = TypeVar("T")

# Statuses that leave a chunk unapplied or its outcome unknown, and that a later attempt can cure:
# the server or its Redis is down or slow, another writer raced it, or a limit was reached for now.
# CANCELLED as an answer comes from the other side, never from this client (its own cancellations
# surface as asyncio.CancelledError or grpc.FutureCancelledError): gRPC core answers it to a call
# that reaches a server in the instant its port closes, so a rolling restart produces it.
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
})


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often to try one operation.

    deadline_s: the whole budget of one operation, first attempt to last answer (None: no bound, then
        `max_attempts` must bound it).
    attempt_timeout_s: the deadline of one attempt; shorter than `deadline_s`, so a stalled attempt
        (a paused Redis, a dead connection) is abandoned and retried while time is left.
    initial_backoff_s, multiplier, max_backoff_s: the n-th retry waits a random time in
        [d/2, d] with d = min(max_backoff_s, initial_backoff_s * multiplier**(n-1)) ("equal jitter":
        never zero, and callers that failed together do not retry together).
    max_attempts: None for as many as the deadline allows.
    """

    deadline_s: float | None = defaults.DEADLINE_S
    attempt_timeout_s: float = defaults.ATTEMPT_TIMEOUT_S
    initial_backoff_s: float = 0.05
    multiplier: float = 2.0
    max_backoff_s: float = 2.0
    max_attempts: int | None = None
    retryable: frozenset[grpc.StatusCode] = RETRYABLE

    def __post_init__(self) -> None:
        if self.deadline_s is None and self.max_attempts is None:
            raise ValueError("a retry policy needs a deadline or a maximum number of attempts")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError("deadline_s must be positive")
        if not self.attempt_timeout_s > 0:
            raise ValueError("attempt_timeout_s must be positive")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def backoff_s(self, retry: int, rng: random.Random | None = None) -> float:
        """The wait before retry number `retry` (1 for the first retry)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** max(0, retry - 1))
        return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


class Budget:
    """The time and attempts left to one operation under a policy (sans I/O: the caller sleeps)."""

    def __init__(self, policy: RetryPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.rng = rng
        self.started = time.monotonic()
        self.attempts = 0

    def remaining_s(self) -> float:
        if self.policy.deadline_s is None:
            return float("inf")
        return self.policy.deadline_s - (time.monotonic() - self.started)

    def attempt_timeout_s(self) -> float:
        """Start an attempt: its timeout, never past the deadline."""
        self.attempts += 1
        return max(0.001, min(self.policy.attempt_timeout_s, self.remaining_s()))

    def next_wait_s(self) -> float | None:
        """After a retryable failure: how long to wait before the next attempt, or None when none is left."""
        policy = self.policy
        if policy.max_attempts is not None and self.attempts >= policy.max_attempts:
            return None
        wait = policy.backoff_s(self.attempts, self.rng)
        remaining = self.remaining_s()
        if remaining <= 0.001:
            return None
        return min(wait, max(0.0, remaining - 0.001))


def status_of(error: BaseException) -> grpc.StatusCode | None:
    """The gRPC status behind an error: an RpcError's code, `.code` of the client's own errors, or
    DEADLINE_EXCEEDED for a local timeout."""
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        return error.code()  # type: ignore[no-any-return]
    code = getattr(error, "code", None)
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(error, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return None


def is_break(error: BaseException) -> bool:
    """Whether `error` ended its call without the server's answer (lstm_stream.wire.is_transport_break):
    a gRPC error judged by its status, details and trailing metadata, or one of this repository's own
    errors that says so (`transport_break = True`, as lstm-loadtest's ChunkFailed does)."""
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        metadata = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        return is_transport_break(error.code(), error.details(), metadata)
    return bool(getattr(error, "transport_break", False))


async def retry_async(
    attempt: Callable[[float], Awaitable[T]],
    policy: RetryPolicy,
    *,
    code_of: Callable[[BaseException], object] = status_of,
    on_error: Callable[[BaseException, bool], None] | None = None,
    stop: Callable[[], bool] | None = None,
    rng: random.Random | None = None,
    breaks: Callable[[BaseException], bool] = is_break,
) -> T:
    """Await `attempt(timeout_s)` until it succeeds, retrying errors whose `code_of` is in the policy's
    retryable set, and breaks (`breaks(error)`, retried as UNAVAILABLE is), while the budget lasts.
    `on_error(error, will_retry)` sees every failure; `stop()` true ends the retries early. The last error
    is raised as it is."""
    budget = Budget(policy, rng)
    while True:
        try:
            return await attempt(budget.attempt_timeout_s())
        except Exception as error:
            retry = code_of(error) in policy.retryable or (
                breaks(error) and grpc.StatusCode.UNAVAILABLE in policy.retryable)
            wait = budget.next_wait_s() if retry else None
            if wait is not None and stop is not None and stop():
                wait = None
            if on_error is not None:
                on_error(error, wait is not None)
            if wait is None:
                raise
            await asyncio.sleep(wait)
