"""Attempts at a Redis call until the caller's deadline: which errors pass by themselves, and the backoff.

Every call of the state layer is bounded by its caller's deadline, not by a socket timeout (invariant 9,
docs/invariants.md): a Redis that stalls for less than the deadline costs latency, not an error. A call
whose answer may have been lost is sent again only when that is safe: reads and deletes always; a save
because the script recognises its own earlier write (server/state/scripts.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis import exceptions as redis_errors

# Errors after which the command surely did not run, and which pass by themselves: retried until the deadline.
# (redis-py turns the known ones into classes; the others keep their code at the start of the message.)
TRANSIENT_ERRORS = (
    redis_errors.BusyLoadingError,  # LOADING: a restarted Redis reading its append-only file
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    redis_errors.MasterDownError,
    redis_errors.ReadOnlyError,  # a replica during a failover
)
TRANSIENT_REPLIES = ("BUSY", "NOREPLICAS")
# Errors after which a command may or may not have reached Redis and run.
LOST_ANSWER_ERRORS = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    TimeoutError,
    OSError,
)
# Retry pacing: first pause, longest pause, and the least time one attempt is given even when the
# deadline is (almost) gone, so that a chunk that already ran is still saved when Redis is healthy.
FIRST_BACKOFF_S = 0.02
MAX_BACKOFF_S = 0.5
MIN_ATTEMPT_S = 0.25

P = TypeVar("P")


class GaveUp(Exception):
    """The deadline passed without an answer from Redis (or Redis refused the command)."""

    def __init__(self, detail: str, *, maybe_ran: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        # True when some attempt may have reached Redis and run: the outcome of a write is unknown.
        self.maybe_ran = maybe_ran


def is_transient(exc: redis_errors.ResponseError) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS) or str(exc).startswith(TRANSIENT_REPLIES)


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | redis_errors.TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


class Attempts:
    """Sends calls until Redis answers or their deadline passes, and remembers whether it answered last."""

    def __init__(self) -> None:
        # False from a call Redis did not answer (or answered "not now") until one it answers.
        self.answering = True

    async def __call__(self, call: Callable[[], Awaitable[P]], deadline: float, *, write: bool = False) -> P:
        """call() until Redis answers, backing off between attempts, until the deadline (monotonic).
        Raises GaveUp; `write`: the call changes Redis, so a lost answer makes its outcome unknown."""
        maybe_ran = False
        pause = FIRST_BACKOFF_S
        while True:
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), MIN_ATTEMPT_S)):
                    answer = await call()
                self.answering = True
                return answer
            except LOST_ANSWER_ERRORS as exc:
                maybe_ran = maybe_ran or write
                problem: BaseException = exc
                self.answering = False
            except redis_errors.ResponseError as exc:
                if not is_transient(exc):
                    raise GaveUp(f"Redis refused the command: {exc}", maybe_ran=maybe_ran) from exc
                problem = exc
                self.answering = False
            except redis_errors.RedisError as exc:  # authentication, unusable URL, protocol trouble
                raise GaveUp(describe(exc), maybe_ran=maybe_ran) from exc
            if time.monotonic() + pause >= deadline:
                raise GaveUp(describe(problem), maybe_ran=maybe_ran) from problem
            await asyncio.sleep(pause)
            pause = min(2 * pause, MAX_BACKOFF_S)
